"""The store's foundation: settings, the S3 client and layout, the bucket, and the write protocol's
parts every resource uses (version claims, committed listings, per-entry locks, verified downloads)."""

from __future__ import annotations

import logging
import hashlib
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from tenants.errors import ConflictError, StoreError, TenantNotFoundError
from tenants.models import utcnow
from tenants.paths import (
    S3Layout,
    adapter_version_name,
    data_version_name,
    validate_adapter_version,
    validate_data_version,
    version_number,
)
from tenants.s3io import S3IO, PreconditionLost, error_code, make_client
from tenants.settings import StoreSettings

logger = logging.getLogger(__name__)


CLAIM_FILE = "_claim.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MAX_CLAIM_TRIES = 50
MAX_CAS_TRIES = 10
ORPHAN_SECONDS = 3600.0


class StoreBase:
    """What every part of the store stands on (see the package docstring for the write protocol)."""

    def __init__(self, settings: StoreSettings | None = None, client: Any = None) -> None:
        self.settings = settings or StoreSettings()
        self.layout = S3Layout(self.settings.prefix)
        self.client = client if client is not None else make_client(self.settings)
        self.io = S3IO(self.client, self.settings)
        self.orphan_seconds = ORPHAN_SECONDS
        self._versioning: bool | None = None  # bucket keeps object versions (read on first purge)
        identity = f"{self.settings.endpoint or 'aws'}|{self.settings.bucket}|{self.layout.prefix}"
        self._cache_root = self.settings.cache_dir / hashlib.sha256(identity.encode()).hexdigest()[:16]
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        logger.debug("tenant store at %s, cache %s", self.settings.describe(), self._cache_root)

    def __getstate__(self) -> dict[str, Any]:
        """Pickles as its settings (for Ray tasks); the client is rebuilt on the other side."""
        return {"settings": self.settings, "orphan_seconds": self.orphan_seconds}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["settings"])  # type: ignore[misc]
        self.orphan_seconds = state["orphan_seconds"]

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (idempotent)."""
        bucket = self.settings.bucket
        try:
            self.io.call("head_bucket", Bucket=bucket)
            return
        except ClientError as error:
            code, status = error_code(error)
            if status != 404 and code not in ("NoSuchBucket", "404", "NotFound"):
                raise StoreError(f"cannot use bucket {bucket!r}: {code or status}") from error
        kwargs: dict[str, Any] = {"Bucket": bucket}
        region = self.settings.region
        if region and region != "us-east-1" and not self.settings.endpoint:
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self.io.call("create_bucket", **kwargs)
            logger.info("created bucket %s", bucket)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code")
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise StoreError(f"cannot create bucket {bucket!r}: {code or error}") from error

    def _require_tenant(self, name: str) -> None:
        if not self.tenant_exists(name):
            raise TenantNotFoundError(f"tenant {name!r} does not exist")

    def _manifests(self, tenant: str, kind: str) -> dict[str, Any]:
        versions = self.list_adapter_versions(tenant) if kind == "adapter" else self.list_data_versions(tenant)
        get = self.get_adapter_manifest if kind == "adapter" else self.get_data_manifest
        with ThreadPoolExecutor(max_workers=8) as pool:
            return dict(zip(versions, pool.map(lambda v: get(tenant, v), versions)))

    def _claim_key(self, tenant: str, kind: str, version: str) -> str:
        if kind == "adapter":
            return self.layout.adapter_dir(tenant, version) + CLAIM_FILE
        return self.layout.data_dir(tenant, version) + CLAIM_FILE

    def _claim(self, tenant: str, kind: str) -> str:
        """Reserve the next version number of ``kind`` with a conditional create."""
        root = self.layout.adapters_root(tenant) if kind == "adapter" else self.layout.data_root(tenant)
        validate = validate_adapter_version if kind == "adapter" else validate_data_version
        name = adapter_version_name if kind == "adapter" else data_version_name
        number = self._max_number(root, validate) + 1
        body = f'{{"writer": "{uuid.uuid4().hex}", "claimed_at": "{utcnow().isoformat()}"}}\n'.encode()
        for _ in range(MAX_CLAIM_TRIES):
            version = name(number)
            try:
                self.io.put_bytes(self._claim_key(tenant, kind, version), body, if_none_match=True,
                                  content_type="application/json")
                return version
            except PreconditionLost:
                number += 1
        raise ConflictError(f"tenant {tenant!r}: could not claim a new {kind} version")

    def _abandon(self, keys: list[str]) -> None:
        """Best-effort removal of an upload that will never commit."""
        try:
            self.io.delete_keys(keys)
        except Exception as error:
            logger.warning("could not clean up %d objects of an abandoned upload (%s); purge will", len(keys), error)

    def _max_number(self, root: str, validate: Callable[[str], str]) -> int:
        numbers = [0]
        for name in self.io.list_dirs(root):
            try:
                numbers.append(version_number(validate(name)))
            except ValueError:
                continue
        return max(numbers)

    def _committed(self, root: str, marker: str) -> list[str]:
        versions = []
        for info in self.io.list(root):
            rest = info.key[len(root):]
            name, _, file_name = rest.partition("/")
            if file_name == marker:
                versions.append(name)
        return sorted(versions, key=lambda v: (version_number(v) if v[1:].isdigit() else -1, v))

    def _lock(self, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(name, threading.Lock())

    def _download_tree(self, final: Path, keys: dict[str, str], sha256s: dict[str, str],
                       extra: dict[str, bytes]) -> None:
        """Download ``keys`` into a temporary sibling of ``final``, verify, then rename into place."""
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            for relative, key in keys.items():
                self.io.download_file(key, staging / relative, sha256s[relative])
            for relative, body in extra.items():
                (staging / relative).write_bytes(body)
            try:
                os.rename(staging, final)
            except OSError:
                if not final.is_dir():  # another process won the rename: use theirs
                    raise
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
