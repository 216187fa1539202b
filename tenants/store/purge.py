"""Purge: deleting superseded data and adapter versions past their grace (with their noncurrent
object versions on a versioned bucket), orphaned uploads, and redacting receipts past retention."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from typing import Any

from tenants.errors import ConflictError, StoreError
from tenants.models import PurgeEntry, ReceiptStatus, utcnow
from tenants.paths import ADAPTER_MANIFEST, DATA_MANIFEST
from tenants.retention import plan_purge, redact_receipt, unapplied_at_head
from tenants.store.base import StoreBase, CLAIM_FILE

logger = logging.getLogger(__name__)


class PurgeMixin(StoreBase):
    """What purge deletes, records and redacts."""

    def purge(
        self,
        tenant: str,
        keep_adapter: str | None,
        keep_data: str | None,
        older_than: float | timedelta | None = None,
        *,
        dry_run: bool = False,
        now: datetime | None = None,
    ) -> list[dict[str, Any]]:
        """Delete superseded versions that still hold records of published erasures.

        A version goes when it is neither HEAD's nor ``keep_*`` and lacks (by lineage, see
        ``tenants.retention``) an erasure published more than ``older_than`` seconds ago
        (default ``purge_grace_seconds``). Uploads that never committed go once older than
        ``orphan_seconds``. The commit marker is deleted first, so a version vanishes from
        listings before its files do. Returns one ``PurgeEntry`` dict (JSON-ready) per version
        deleted; pass them to :meth:`record_purge` to log them in the receipts.
        """
        now = now or utcnow()
        grace = older_than if isinstance(older_than, timedelta) else timedelta(
            seconds=self.settings.purge_grace_seconds if older_than is None else float(older_than)
        )
        head, _ = self.get_head(tenant)
        protected = {v for v in (keep_adapter, keep_data) if v}
        if head is not None:
            protected |= {head.adapter, head.data}
        adapters = self._manifests(tenant, "adapter")
        datasets = self._manifests(tenant, "data")
        published = {
            r.request_id: r.published_at or r.updated_at
            for r in self.list_receipts(tenant, ReceiptStatus.published)
        }
        missing = unapplied_at_head(adapters, datasets, published, head and head.adapter, head and head.data)
        if missing:
            logger.warning("tenant %s: HEAD's lineage lacks published erasures %s", tenant, sorted(missing))
        entries: list[PurgeEntry] = []
        for candidate in plan_purge(adapters, datasets, published, protected, now, grace):
            if candidate.kind == "adapter":
                prefix = self.layout.adapter_dir(tenant, candidate.version)
                marker = self.layout.adapter_manifest(tenant, candidate.version)
            else:
                prefix = self.layout.data_dir(tenant, candidate.version)
                marker = self.layout.data_manifest(tenant, candidate.version)
            count = 0 if dry_run else self.io.delete_prefix(prefix, first=marker, keep={prefix + CLAIM_FILE})
            entries.append(PurgeEntry(kind=candidate.kind, version=candidate.version, key=prefix, objects=count,
                                      request_ids=list(candidate.request_ids), deleted_at=utcnow()))
        entries += self._purge_orphans(tenant, protected, now, dry_run)
        if not dry_run:
            self.redact_receipts(tenant, now)
            # a versioned bucket keeps what was just deleted or redacted as noncurrent versions
            swept = self._purge_noncurrent(tenant)
            for entry in entries:
                entry.objects += sum(1 for key in swept if key.startswith(entry.key))
        for entry in entries:
            logger.info("tenant %s: purged %s %s (%d objects) for %s%s", tenant, entry.kind, entry.version,
                        entry.objects, entry.request_ids, " [dry run]" if dry_run else "")
        return [entry.model_dump(mode="json") for entry in entries]

    def record_purge(self, tenant: str, entries: Iterable[dict[str, Any] | PurgeEntry]) -> list[str]:
        """Append purge entries to the receipts of the requests they name; returns those ids."""
        by_request: dict[str, list[PurgeEntry]] = {}
        for item in entries:
            entry = item if isinstance(item, PurgeEntry) else PurgeEntry.model_validate(item)
            for request_id in entry.request_ids:
                by_request.setdefault(request_id, []).append(entry)
        for request_id, items in by_request.items():
            self.update_receipt(tenant, request_id, lambda r, items=items: r.update(purged=list(r.purged) + items))
        return sorted(by_request)

    def _purge_orphans(self, tenant: str, protected: set[str], now: datetime, dry_run: bool) -> list[PurgeEntry]:
        """Delete version directories without a commit marker, untouched for ``orphan_seconds``."""
        entries = []
        cutoff = now - timedelta(seconds=self.orphan_seconds)
        for kind, root, version, infos in self.uncommitted(tenant):
            if version in protected or max(i.last_modified for i in infos) > cutoff:
                continue  # possibly an upload still in flight
            count = 0 if dry_run else self.io.delete_keys([i.key for i in infos])
            entries.append(PurgeEntry(kind=f"{kind}-partial", version=version, key=f"{root}{version}/", objects=count,
                                      deleted_at=utcnow()))
        return entries

    def uncommitted(self, tenant: str) -> Iterator[tuple[str, str, str, list[Any]]]:
        """(kind, root, version, its objects but the claim) of each version directory that holds files
        but no commit marker: an upload that never committed, or a purge interrupted after the marker."""
        for kind, root, marker in (("adapter", self.layout.adapters_root(tenant), ADAPTER_MANIFEST),
                                   ("data", self.layout.data_root(tenant), DATA_MANIFEST)):
            groups: dict[str, list[Any]] = {}
            for info in self.io.list(root):
                name = self.layout.child_name(root, info.key)
                if name:
                    groups.setdefault(name, []).append(info)
            for version, infos in sorted(groups.items()):
                if any(i.key == f"{root}{version}/{marker}" for i in infos):
                    continue
                infos = [i for i in infos if i.key != f"{root}{version}/{CLAIM_FILE}"]  # claims stay
                if infos:
                    yield kind, root, version, infos

    def redact_receipts(self, tenant: str, now: datetime | None = None) -> list[str]:
        """Redact the published and rejected receipts that ended more than
        ``receipt_redact_after_seconds`` ago (``tenants.retention.redact_receipt``); returns their ids."""
        after = self.settings.receipt_redact_after_seconds
        if after is None:
            return []
        cutoff = (now or utcnow()) - timedelta(seconds=after)
        done = []
        for receipt in self.list_receipts(tenant):
            ended = receipt.published_at or receipt.rejected_at
            if receipt.status not in (ReceiptStatus.published, ReceiptStatus.rejected) or receipt.redacted_at \
                    or ended is None or ended > cutoff:
                continue
            try:
                self.save_receipt(redact_receipt(receipt, utcnow()))
            except ConflictError:  # changed meanwhile (a purge entry appended): the next purge redacts it
                continue
            done.append(receipt.request_id)
        if done:
            logger.info("tenant %s: redacted %d receipts past retention", tenant, len(done))
        return done

    def bucket_versioned(self) -> bool:
        """Whether the bucket keeps object versions (versioning Enabled or Suspended; read once)."""
        if self._versioning is None:
            status = self.io.call("get_bucket_versioning", Bucket=self.settings.bucket).get("Status")
            self._versioning = status in ("Enabled", "Suspended")
        return self._versioning

    def _purge_noncurrent(self, tenant: str) -> list[str]:
        """On a versioned bucket, delete every hidden copy under the tenant's prefix: noncurrent
        versions (what a delete or an overwrite left behind) and the delete markers of keys that no
        longer exist, with every version of those keys. Current objects are never touched. Returns
        the key of each version deleted."""
        if not self.bucket_versioned():
            return []
        doomed = self._hidden_versions(self.layout.tenant_dir(tenant))
        for start in range(0, len(doomed), 1000):
            batch = doomed[start:start + 1000]
            response = self.io.call("delete_objects", Bucket=self.settings.bucket, Delete={
                "Objects": [{"Key": key, "VersionId": version} for key, version in batch], "Quiet": True})
            if response.get("Errors"):
                error = response["Errors"][0]
                raise StoreError(f"tenant {tenant!r}: could not delete {len(response['Errors'])} noncurrent "
                                 f"versions, e.g. {error.get('Key')}: {error.get('Code')}")
        if doomed:
            logger.info("tenant %s: deleted %d noncurrent object versions and delete markers", tenant, len(doomed))
        return [key for key, _ in doomed]

    def hidden_copies(self, tenant: str) -> int:
        """How many noncurrent object versions and delete markers lie under ``tenant``'s adapter and data
        versions (0 on an unversioned bucket): what a purge deleted but the bucket still keeps."""
        if not self.bucket_versioned():
            return 0
        roots = (self.layout.adapters_root(tenant), self.layout.data_root(tenant))
        return sum(len(self._hidden_versions(root)) for root in roots)

    def _hidden_versions(self, prefix: str) -> list[tuple[str, str]]:
        """(key, version id) of every hidden copy under ``prefix``: noncurrent versions, and every version
        of a key whose latest entry is a delete marker (the marker included)."""
        latest: dict[str, bool] = {}  # key -> its latest entry is a delete marker
        versions: list[tuple[str, str, bool]] = []  # (key, version id, is latest)
        kwargs: dict[str, Any] = {"Bucket": self.settings.bucket, "Prefix": prefix}
        while True:
            page = self.io.call("list_object_versions", **kwargs)
            for marker, items in ((False, page.get("Versions", [])), (True, page.get("DeleteMarkers", []))):
                for item in items:
                    versions.append((item["Key"], item["VersionId"], bool(item.get("IsLatest"))))
                    if item.get("IsLatest"):
                        latest[item["Key"]] = marker
            if not page.get("IsTruncated"):
                break
            kwargs.update(KeyMarker=page.get("NextKeyMarker"), VersionIdMarker=page.get("NextVersionIdMarker"))
        return [(key, version) for key, version, is_latest in versions if not is_latest or latest.get(key, True)]
