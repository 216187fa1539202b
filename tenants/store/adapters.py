"""Adapter versions (immutable PEFT directories, committed by ``eraser.json``) and HEAD, the pointer
to the live (adapter, data) pair that moves only by compare-and-swap."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from tenants.errors import ConflictError, HeadConflictError, StoreError, VersionNotFoundError
from tenants.models import AdapterManifest, Head, utcnow
from tenants.paths import (
    ADAPTER_MANIFEST,
    adapter_version_name,
    validate_adapter_version,
    validate_request_id,
    validate_tenant_name,
)
from tenants.s3io import PreconditionLost
from tenants.store.base import StoreBase, ADAPTER_WEIGHTS
from tenants.store.imports import adapter_files

logger = logging.getLogger(__name__)


class AdaptersMixin(StoreBase):
    """Publishing, listing and caching adapter versions; reading and moving HEAD."""

    def publish_adapter(self, tenant: str, local_dir: str | Path, manifest: AdapterManifest) -> str:
        """Upload a PEFT adapter directory as the next immutable version; returns it (``v000001``, ...).

        Every file gets a sha256 in the manifest; ``eraser.json`` is written last as the commit
        point, so a failed upload never shows up as a version.
        """
        local_dir = Path(local_dir)
        self._require_tenant(tenant)
        names = adapter_files(local_dir)
        if manifest.parent_version is not None:
            self.get_adapter_manifest(tenant, manifest.parent_version)
        if manifest.data_version is not None:
            self.get_data_manifest(tenant, manifest.data_version)
        for request_id in manifest.request_ids:
            validate_request_id(request_id)
        if manifest.base_model is None:
            manifest = manifest.model_copy(update={"base_model": self.get_tenant(tenant).base_model})
        version = self._claim(tenant, "adapter")
        written: list[str] = []
        try:
            files: dict[str, str] = {}
            for name in names:
                key = self.layout.adapter_file(tenant, version, name)
                written.append(key)
                files[name] = self.io.upload_file(key, local_dir / name)
            final = manifest.model_copy(
                update={"version": version, "tenant": tenant, "files": files, "sha256": files[ADAPTER_WEIGHTS],
                        "created_at": utcnow()}
            )
            final = AdapterManifest.model_validate(final.model_dump())
        except BaseException:
            self._abandon(written)
            raise
        # The commit point. If this write fails ambiguously the files stay for purge to collect.
        self.io.put_model(self.layout.adapter_manifest(tenant, version), final, if_none_match=True)
        logger.info("tenant %s: adapter version %s published (%d files)", tenant, version, len(files))
        return version

    def next_adapter_version(self, tenant: str) -> str:
        """The version the next publish would get (not reserved: publish claims its own)."""
        return adapter_version_name(self._max_number(self.layout.adapters_root(tenant), validate_adapter_version) + 1)

    def list_adapter_versions(self, tenant: str) -> list[str]:
        """Committed adapter versions of ``tenant``, oldest first."""
        return self._committed(self.layout.adapters_root(tenant), ADAPTER_MANIFEST)

    def get_adapter_manifest(self, tenant: str, version: str) -> AdapterManifest:
        found = self.io.get_model(self.layout.adapter_manifest(tenant, version), AdapterManifest)
        if found is None:
            raise VersionNotFoundError(f"tenant {tenant!r} has no adapter version {version!r}")
        return found[0]

    def adapter_cache_path(self, tenant: str, version: str) -> Path:
        """Where :meth:`download_adapter` puts a version (one directory per tenant and version)."""
        return self._cache_root / "tenants" / validate_tenant_name(tenant) / "adapters" / validate_adapter_version(version)

    def download_adapter(self, tenant: str, version: str) -> Path:
        """The local directory of an adapter version, downloaded once and sha256-verified.

        ChecksumMismatchError if any file differs from ``eraser.json``; the cache then holds
        nothing for this version. The directory appears atomically (rename).
        """
        final = self.adapter_cache_path(tenant, version)
        with self._lock(str(final)):
            if final.is_dir():
                return final
            found = self.io.get_bytes(self.layout.adapter_manifest(tenant, version))
            if found is None:
                raise VersionNotFoundError(f"tenant {tenant!r} has no adapter version {version!r}")
            manifest = AdapterManifest.model_validate_json(found[0])
            if manifest.sha256 is not None and manifest.files.get(ADAPTER_WEIGHTS) != manifest.sha256:
                raise StoreError(f"tenant {tenant!r} adapter {version}: eraser.json is inconsistent (weights sha256)")
            keys = {name: self.layout.adapter_file(tenant, version, name) for name in manifest.files}
            self._download_tree(final, keys, manifest.files, {ADAPTER_MANIFEST: found[0]})
            logger.info("tenant %s: adapter %s downloaded to %s", tenant, version, final)
            return final

    def evict_adapter(self, tenant: str, version: str) -> bool:
        """Delete a version from the local cache (after a replica switched away from it)."""
        final = self.adapter_cache_path(tenant, version)
        with self._lock(str(final)):
            if not final.exists():
                return False
            shutil.rmtree(final)
            return True

    def get_head(self, tenant: str) -> tuple[Head | None, str | None]:
        """(HEAD, its ETag), or (None, None) before the first move."""
        found = self.io.get_model(self.layout.head(tenant), Head)
        if found is None:
            return None, None
        return found

    def move_head(self, tenant: str, new: Head, expected_etag: str | None) -> str:
        """Point HEAD at committed versions by compare-and-swap; returns the new ETag.

        ``expected_etag=None`` creates HEAD (fails if one exists), else HEAD must still have that
        ETag. HeadConflictError when the condition fails; VersionNotFoundError for unknown versions.
        """
        adapter = self.get_adapter_manifest(tenant, new.adapter)
        self.get_data_manifest(tenant, new.data)
        if adapter.data_version is not None and adapter.data_version != new.data:
            raise ConflictError(
                f"tenant {tenant!r}: adapter {new.adapter} reflects data {adapter.data_version}, not {new.data}"
            )
        stamped = new.model_copy(update={"updated_at": utcnow()})
        try:
            if expected_etag is None:
                etag = self.io.put_model(self.layout.head(tenant), stamped, if_none_match=True)
            else:
                etag = self.io.put_model(self.layout.head(tenant), stamped, if_match=expected_etag)
        except PreconditionLost as error:
            expected = "no HEAD yet" if expected_etag is None else f"ETag {expected_etag}"
            raise HeadConflictError(
                f"tenant {tenant!r}: HEAD changed since it was read (expected {expected}); re-read it and retry"
            ) from error
        logger.info("tenant %s: HEAD -> adapter %s, data %s", tenant, new.adapter, new.data)
        return etag
