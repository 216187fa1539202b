"""Dataset versions: immutable, sharded JSONL record sets, committed by ``dataset.json``."""

from __future__ import annotations

import logging
import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

from tenants.errors import VersionNotFoundError
from tenants.models import DataManifest, Record, ShardInfo
from tenants.paths import DATA_MANIFEST, shard_name, validate_request_id
from tenants.records import ShardWriter, coerce_records, iter_shard
from tenants.store.base import StoreBase

logger = logging.getLogger(__name__)


class DatasetsMixin(StoreBase):
    """Writing and reading a tenant's data versions."""

    def put_dataset(
        self,
        tenant: str,
        records: Iterable[Record | dict[str, Any]],
        parent: str | None = None,
        request_ids: Iterable[str] = (),
    ) -> str:
        """Write a new immutable data version (gzip JSON Lines shards, then ``dataset.json``).

        Streams ``records`` once; InvalidRecordsError on an invalid record or a duplicate id, in
        which case nothing becomes visible. Returns the new data version (``d000001``, ...).
        """
        self._require_tenant(tenant)
        if parent is not None:
            self.get_data_manifest(tenant, parent)
        request_ids = [validate_request_id(r) for r in request_ids]
        version = self._claim(tenant, "data")
        written: list[str] = []
        try:
            shards: list[ShardInfo] = []
            writer = ShardWriter(self.settings.shard_bytes)
            total = 0

            def flush(shard: tuple[bytes, int] | None) -> None:
                if shard is None:
                    return
                body, count = shard
                name = shard_name(len(shards))
                key = self.layout.data_shard(tenant, version, len(shards))
                written.append(key)
                self.io.put_bytes(key, body, content_type="application/gzip")
                shards.append(ShardInfo(name=name, records=count, sha256=hashlib.sha256(body).hexdigest(), bytes=len(body)))

            for record in coerce_records(records):
                total += 1
                flush(writer.add(record))
            flush(writer.finish())
            manifest = DataManifest(
                version=version, tenant=tenant, parent=parent, request_ids=request_ids, records=total, shards=shards
            )
        except BaseException:
            self._abandon(written)
            raise
        self.io.put_model(self.layout.data_manifest(tenant, version), manifest, if_none_match=True)
        logger.info("tenant %s: data version %s committed (%d records, %d shards)", tenant, version, total, len(shards))
        return version

    def get_data_manifest(self, tenant: str, version: str) -> DataManifest:
        found = self.io.get_model(self.layout.data_manifest(tenant, version), DataManifest)
        if found is None:
            raise VersionNotFoundError(f"tenant {tenant!r} has no data version {version!r}")
        return found[0]

    def iter_dataset(self, tenant: str, data_version: str) -> Iterator[Record]:
        """Stream the records of a committed data version, each shard verified by sha256 first."""
        manifest = self.get_data_manifest(tenant, data_version)
        for index, shard in enumerate(manifest.shards):
            key = self.layout.data_shard(tenant, data_version, index)
            with self.io.download_verified(key, shard.sha256) as handle:
                yield from iter_shard(handle, source=key)

    def read_dataset(self, tenant: str, data_version: str) -> list[Record]:
        return list(self.iter_dataset(tenant, data_version))

    def list_data_versions(self, tenant: str) -> list[str]:
        """Committed data versions of ``tenant``, oldest first."""
        return self._committed(self.layout.data_root(tenant), DATA_MANIFEST)
