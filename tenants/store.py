"""The tenant store: tenants, datasets, adapter versions, HEAD, the erasure ledger, purge, API keys.

Write protocol (why a half-written version is never visible):
- a new data/adapter version number is *claimed* first with a conditional create of
  ``<version>/_claim.json`` (``IfNoneMatch="*"``), so two writers never share a number. The claim
  stays for good (purge keeps it too): a number, once taken, is never reused, so a version name
  always means the same bytes to every cache (vLLM keys LoRA caches by name);
- the files are uploaded, then the commit marker is written LAST, also conditionally:
  ``dataset.json`` for data, ``eraser.json`` for adapters, ``eraser-model.json`` for models;
- only versions with a commit marker are listed, downloaded or accepted by ``move_head``.
  Uploads that never commit are cleaned up on failure, or by purge once older than
  ``orphan_seconds``.
- HEAD.json moves only by compare-and-swap (``IfNoneMatch="*"`` to create, ``IfMatch`` the ETag
  read), and every HEAD.json carries its time so two HEADs never share an ETag.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError
from pydantic import ValidationError

from tenants import keys as apikeys
from tenants.errors import (
    AuthError,
    ConflictError,
    InvalidConfigError,
    HeadConflictError,
    InvalidAdapterError,
    ReceiptNotFoundError,
    StoreError,
    TenantExistsError,
    TenantNotFoundError,
    UnknownRecordError,
    VersionNotFoundError,
)
from tenants.models import (
    AdapterManifest,
    DataManifest,
    ErasureRequest,
    Head,
    KeyHash,
    LoraRecipe,
    ModelManifest,
    PurgeEntry,
    Receipt,
    ReceiptStatus,
    Record,
    ShardInfo,
    TenantConfig,
    TrainingRecipe,
    utcnow,
)
from tenants.paths import (
    ADAPTER_MANIFEST,
    DATA_MANIFEST,
    MODEL_MANIFEST,
    S3Layout,
    adapter_version_name,
    data_version_name,
    shard_name,
    validate_adapter_version,
    validate_data_version,
    validate_model_name,
    validate_relative_file,
    validate_request_id,
    validate_tenant_name,
    version_number,
)
from tenants.records import ShardWriter, coerce_records, imported_dataset, iter_shard
from tenants.retention import plan_purge, redact_receipt, unapplied_at_head
from tenants.s3io import S3IO, PreconditionLost, error_code, local_files, make_client
from tenants.settings import StoreSettings

logger = logging.getLogger(__name__)

CLAIM_FILE = "_claim.json"
ADAPTER_REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MAX_CLAIM_TRIES = 50
MAX_CAS_TRIES = 10
ORPHAN_SECONDS = 3600.0
# ImportCheck(config, adapter_dir, records) -> evidence for eraser.json: whatever must hold before an
# imported tenant is written that the store cannot see (the adapter fits its base: the cluster layer).
ImportCheck = Callable[[TenantConfig, Path, list[Record]], dict[str, Any]]
# The recipe fields an import decides itself, and the ones that make a recipe a training recipe.
IMPORT_DECIDES = ("heldout_unit", "heldout_fraction", "reproducible")
TRAINING_FIELDS = ("epochs", "lr", "batch_size")
# adapter_config.json fields a LoraRecipe (one rank, one alpha, module names on every layer) cannot say.
UNDESCRIBED_LORA_FIELDS = ("rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "exclude_modules")


def adapter_files(local_dir: Path) -> list[str]:
    """The files of a PEFT adapter directory to upload (InvalidAdapterError if it lacks config or weights)."""
    if not local_dir.is_dir():
        raise InvalidAdapterError(f"adapter directory {str(local_dir)!r} does not exist")
    missing = [name for name in ADAPTER_REQUIRED_FILES if not (local_dir / name).is_file()]
    if missing:
        raise InvalidAdapterError(f"adapter directory {str(local_dir)!r} lacks {missing}")
    names = local_files(local_dir, skip={ADAPTER_MANIFEST, CLAIM_FILE})
    for name in names:
        validate_relative_file(name)
    return names


def lora_from_peft_config(peft_config: dict[str, Any]) -> LoraRecipe:
    """The tenant's LoRA shape read from an adapter's ``adapter_config.json``. Refused: what one rank,
    alpha and module list cannot say (per-module ranks or alphas, some layers only, a module pattern
    instead of names), because the tenant's recipe, and the retrain built from it, must describe the
    adapter exactly. Other PEFT features are the method's to refuse when it loads the adapter."""
    where = "adapter_config.json"
    if peft_config.get("peft_type") not in (None, "LORA"):
        raise InvalidAdapterError(f"{where}: peft_type {peft_config.get('peft_type')!r} is not LoRA")
    for field in ("r", "lora_alpha", "target_modules"):
        if peft_config.get(field) is None:
            raise InvalidAdapterError(f"{where}: {field!r} is missing")
    modules = peft_config["target_modules"]
    if isinstance(modules, str):
        raise InvalidAdapterError(f"{where}: target_modules is a pattern ({modules!r}); a list of module names "
                                  "is needed (PEFT saves one for adapters it built from a list or 'all-linear')")
    for field in UNDESCRIBED_LORA_FIELDS:
        if peft_config.get(field):
            raise InvalidAdapterError(f"{where}: {field} {peft_config[field]!r} is not supported: the tenant's LoRA "
                                      "recipe is one rank and one alpha on every layer's target modules")
    try:
        return LoraRecipe(rank=peft_config["r"], alpha=peft_config["lora_alpha"],
                          dropout=peft_config.get("lora_dropout") or 0.0, target_modules=sorted(modules),
                          use_rslora=bool(peft_config.get("use_rslora", False)))
    except ValidationError as error:
        first = error.errors()[0]
        raise InvalidAdapterError(f"{where}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def imported_config(name: str, base_model: str, peft_config: dict[str, Any],
                    recipe: dict[str, Any] | None = None) -> TenantConfig:
    """``tenant.json`` of an imported tenant: the LoRA shape from the adapter's config, the reference given
    (``heldout_unit`` "given"), and the recipe if one was given. A recipe naming epochs, lr and batch_size
    is the one that trained the adapter: the exact-retrain fallback uses it. One with only rendering fields
    (max_length, chat_template) or none at all leaves the tenant ``reproducible: false``."""
    recipe = dict(recipe or {})
    decided = sorted(set(recipe) & set(IMPORT_DECIDES))
    if decided:
        raise InvalidConfigError(f"recipe: {decided} cannot be set for an import: the reference records are given")
    if "lora" in recipe:
        raise InvalidConfigError("recipe: 'lora' cannot be set: the LoRA shape is read from adapter_config.json")
    named = [field for field in TRAINING_FIELDS if field in recipe]
    if named and len(named) != len(TRAINING_FIELDS):
        missing = [field for field in TRAINING_FIELDS if field not in recipe]
        raise InvalidConfigError(f"recipe: a training recipe names {list(TRAINING_FIELDS)}; missing {missing} "
                                 "(give only max_length/chat_template when the training recipe is unknown)")
    try:
        training = TrainingRecipe(**recipe, heldout_unit="given", reproducible=bool(named))
        return TenantConfig(name=name, base_model=base_model, lora=lora_from_peft_config(peft_config), training=training)
    except (ValidationError, TypeError) as error:
        detail = (f"{'.'.join(map(str, error.errors()[0]['loc']))}: {error.errors()[0]['msg']}"
                  if isinstance(error, ValidationError) else str(error))
        raise InvalidConfigError(f"recipe: {detail}") from None


class TenantStore:
    """All persistent state of the service, in one S3 bucket under one prefix (docs/architecture.md#s3-layout).

    ``client`` may be any object with boto3's S3 client methods (tests wrap one to inject faults).
    Thread-safe: boto3 clients are, and the local caches are guarded by per-entry locks.
    """

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

    # ================================================================ bucket
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

    # ================================================================ tenants
    def create_tenant(self, config: TenantConfig) -> TenantConfig:
        """Write ``tenant.json``; TenantExistsError if the name is taken (atomic)."""
        try:
            self.io.put_model(self.layout.tenant_config(config.name), config, if_none_match=True)
        except PreconditionLost as error:
            raise TenantExistsError(f"tenant {config.name!r} already exists") from error
        logger.info("tenant %s created (base model %s)", config.name, config.base_model)
        return config

    def get_tenant(self, name: str) -> TenantConfig:
        return self._get_tenant(name)[0]

    def _get_tenant(self, name: str) -> tuple[TenantConfig, str]:
        found = self.io.get_model(self.layout.tenant_config(name), TenantConfig)
        if found is None:
            raise TenantNotFoundError(f"tenant {name!r} does not exist")
        return found

    def tenant_exists(self, name: str) -> bool:
        return self.io.exists(self.layout.tenant_config(name))

    def list_tenants(self) -> list[str]:
        """Names of all tenants, sorted."""
        names = []
        for name in self.io.list_dirs(self.layout.tenants_root()):
            try:
                validate_tenant_name(name)
            except ValueError:
                continue
            if self.tenant_exists(name):
                names.append(name)
        return sorted(names)

    def update_tenant(self, name: str, change: Callable[[TenantConfig], None]) -> TenantConfig:
        """Read-modify-write ``tenant.json`` with compare-and-swap, retrying lost races."""
        for _ in range(MAX_CAS_TRIES):
            config, etag = self._get_tenant(name)
            change(config)
            if config.name != name:
                raise ConflictError(f"tenant {name!r}: the name cannot be changed")
            try:
                self.io.put_model(self.layout.tenant_config(name), config, if_match=etag)
                return config
            except PreconditionLost:
                continue
        raise ConflictError(f"tenant {name!r}: tenant.json kept changing; gave up after {MAX_CAS_TRIES} tries")

    def _require_tenant(self, name: str) -> None:
        if not self.tenant_exists(name):
            raise TenantNotFoundError(f"tenant {name!r} does not exist")

    # ================================================================ datasets
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

    # ================================================================ adapters
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

    # ================================================================ importing an adapter
    def import_tenant(self, config: TenantConfig, adapter_dir: str | Path, records: Iterable[Record | dict[str, Any]],
                      reference: Iterable[Record | dict[str, Any]], check: ImportCheck | None = None,
                      via: str | None = None) -> Head:
        """Bring in a tenant whose adapter was trained elsewhere, as if the service had trained it: tenant.json,
        data version 1 (``records`` and then ``reference``, flagged ``heldout``), adapter version 1
        (``path: "import"``) and HEAD on the two.

        Everything is validated before the first write: the config (``heldout_unit`` must be "given"), the
        name (TenantExistsError), the records and the reference (``tenants.records.check_reference``), the
        adapter directory, then ``check`` (what only the method can tell: the adapter fits its base). So a
        refused import writes nothing. Should a write fail afterwards, what was written is removed again
        (version claims stay, as they always do) and the error raised.
        """
        adapter_dir = Path(adapter_dir)
        if config.training.heldout_unit != "given":
            raise InvalidConfigError(f"tenant {config.name!r}: an imported tenant's reference is given "
                                     f"(training.heldout_unit 'given'), not {config.training.heldout_unit!r}")
        if self.tenant_exists(config.name):
            raise TenantExistsError(f"tenant {config.name!r} already exists")
        dataset = imported_dataset(records, reference)
        adapter_files(adapter_dir)
        evidence = check(config, adapter_dir, dataset) if check is not None else {}
        heldout = sum(1 for r in dataset if r.heldout)
        manifest = AdapterManifest(
            parent_version=None, base_model=config.base_model, path="import",
            checks={"import": evidence, "train_records": len(dataset) - heldout, "heldout_records": heldout,
                    "retrain_fallback": config.retrain_unavailable() or "available"},
            arguments={"imported": {"via": via, "recipe_given": config.training.reproducible},
                       "recipe": config.training.model_dump(mode="json") if config.training.reproducible else None,
                       "lora": config.lora.model_dump(mode="json")})
        self.create_tenant(config)
        try:
            data = self.put_dataset(config.name, dataset)
            version = self.publish_adapter(config.name, adapter_dir, manifest.model_copy(update={"data_version": data}))
            head = Head(adapter=version, data=data)
            self.move_head(config.name, head, None)
        except BaseException:
            self._remove_tenant(config.name)
            raise
        logger.info("tenant %s imported: adapter %s, data %s (%d training, %d reference records), retrain fallback %s",
                    config.name, version, data, len(dataset) - heldout, heldout,
                    config.retrain_unavailable() or "available")
        return head

    def _remove_tenant(self, name: str) -> None:
        """Undo a tenant that never became whole (an import whose writes failed): tenant.json first, so it
        stops being a tenant at once, then the rest; version claims stay (numbers are never reused)."""
        root = self.layout.tenant_dir(name)
        claims = {info.key for info in self.io.list(root) if info.key.endswith("/" + CLAIM_FILE)}
        try:
            self.io.delete_prefix(root, first=self.layout.tenant_config(name), keep=claims)
        except Exception as error:
            logger.warning("tenant %s: could not remove a failed import (%s); delete %s by hand", name, error, root)

    # ================================================================ HEAD
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

    # ================================================================ base models
    def put_model(self, name: str, local_dir: str | Path) -> ModelManifest:
        """Upload a base model directory (HF format) under ``models/<name>/``; immutable once written."""
        local_dir = Path(local_dir)
        validate_model_name(name)
        if not local_dir.is_dir():
            raise VersionNotFoundError(f"model directory {str(local_dir)!r} does not exist")
        if self.io.exists(self.layout.model_manifest(name)):
            raise ConflictError(f"model {name!r} is already uploaded (models are immutable)")
        files = {}
        for relative in local_files(local_dir, skip={MODEL_MANIFEST}):
            files[relative] = self.io.upload_file(self.layout.model_file(name, relative), local_dir / relative)
        manifest = ModelManifest(name=name, files=files)
        try:
            self.io.put_model(self.layout.model_manifest(name), manifest, if_none_match=True)
        except PreconditionLost as error:
            raise ConflictError(f"model {name!r} was uploaded concurrently") from error
        logger.info("model %s uploaded (%d files)", name, len(files))
        return manifest

    def list_models(self) -> list[str]:
        root = self.layout.models_root()
        return sorted(
            info.key[len(root):-len(MODEL_MANIFEST) - 1]
            for info in self.io.list(root)
            if info.key.endswith("/" + MODEL_MANIFEST)
        )

    def download_model(self, name: str) -> Path:
        """The local directory of a base model, downloaded once and sha256-verified."""
        final = self._cache_root / "models" / validate_model_name(name).replace("/", "--")
        with self._lock(str(final)):
            if final.is_dir():
                return final
            found = self.io.get_bytes(self.layout.model_manifest(name))
            if found is None:
                raise VersionNotFoundError(f"no model {name!r} under {self.layout.models_root()}")
            manifest = ModelManifest.model_validate_json(found[0])
            keys = {rel: self.layout.model_file(name, rel) for rel in manifest.files}
            self._download_tree(final, keys, manifest.files, {MODEL_MANIFEST: found[0]})
            return final

    def resolve_base_model(self, base_model: str) -> Path:
        """A local directory for a tenant's ``base_model``: a local path, or a model under models/."""
        if base_model.startswith("s3://"):
            bucket, _, key = base_model[len("s3://"):].partition("/")
            root = self.layout.models_root()
            if bucket != self.settings.bucket or not key.startswith(root):
                raise VersionNotFoundError(
                    f"base model {base_model!r}: only s3://{self.settings.bucket}/{root}<name> is supported"
                )
            return self.download_model(key[len(root):].strip("/"))
        path = Path(base_model).expanduser()
        if path.is_dir():
            return path
        return self.download_model(base_model)

    # ================================================================ ledger
    def submit_erasure(self, request: ErasureRequest, validate: bool = True) -> tuple[Receipt, bool]:
        """Record a request as pending; (receipt, created). Idempotent by request id.

        The same id again returns the existing receipt with ``created=False``; the same id with a
        different body is a ConflictError. With ``validate`` the selection is resolved against
        HEAD's dataset first (UnknownRecordError for ids or subjects it does not hold).
        """
        tenant = request.tenant
        self._require_tenant(tenant)
        key = self.layout.receipt(tenant, request.request_id)
        existing = self.io.get_model(key, Receipt)
        if existing is not None:
            return self._same_request(existing, request), False
        if validate:
            head, _ = self.get_head(tenant)
            if head is None:
                raise UnknownRecordError(f"tenant {tenant!r} has no live dataset yet (HEAD not set)")
            request.resolve(self.iter_dataset(tenant, head.data))
        receipt = Receipt(request=request)
        try:
            receipt._etag = self.io.put_model(key, receipt, if_none_match=True)
        except PreconditionLost:
            existing = self.io.get_model(key, Receipt)
            if existing is None:  # created and deleted in between: vanishingly unlikely
                raise ConflictError(f"request {request.request_id!r}: ledger entry changed during submit") from None
            return self._same_request(existing, request), False
        logger.info("tenant %s: erasure %s recorded (%s)", tenant, request.request_id, request.kind)
        return receipt, True

    @staticmethod
    def _same_request(found: tuple[Receipt, str], request: ErasureRequest) -> Receipt:
        receipt, etag = found
        receipt._etag = etag
        given = request
        if receipt.redacted_at is not None:  # compare in the redacted form
            given = redact_receipt(Receipt(request=request), receipt.redacted_at).request
        if receipt.request.model_dump() != given.model_dump():
            raise ConflictError(
                f"request id {request.request_id!r} of tenant {request.tenant!r} was already used for a different request"
            )
        return receipt

    def get_receipt(self, tenant: str, request_id: str) -> Receipt:
        found = self.io.get_model(self.layout.receipt(tenant, request_id), Receipt)
        if found is None:
            raise ReceiptNotFoundError(f"tenant {tenant!r} has no erasure request {request_id!r}")
        receipt, etag = found
        receipt._etag = etag
        return receipt

    def save_receipt(self, receipt: Receipt) -> Receipt:
        """Write a receipt back. If it was read from the store (or saved before), the write is a
        compare-and-swap on that version (ConflictError if someone else changed it meanwhile)."""
        key = self.layout.receipt(receipt.tenant, receipt.request_id)
        try:
            if receipt._etag:
                receipt._etag = self.io.put_model(key, receipt, if_match=receipt._etag)
            else:
                receipt._etag = self.io.put_model(key, receipt)
        except PreconditionLost as error:
            raise ConflictError(
                f"request {receipt.request_id!r} of tenant {receipt.tenant!r}: the receipt changed since it was read"
            ) from error
        return receipt

    def update_receipt(self, tenant: str, request_id: str, change: Callable[[Receipt], None]) -> Receipt:
        """Read-modify-write a receipt with compare-and-swap, retrying lost races."""
        for _ in range(MAX_CAS_TRIES):
            receipt = self.get_receipt(tenant, request_id)
            change(receipt)
            try:
                return self.save_receipt(receipt)
            except ConflictError:
                continue
        raise ConflictError(f"request {request_id!r} of tenant {tenant!r}: receipt kept changing")

    def list_receipts(self, tenant: str, status: ReceiptStatus | str | None = None) -> list[Receipt]:
        """Receipts of ``tenant`` (optionally one status), oldest first."""
        self._require_tenant(tenant)
        wanted = ReceiptStatus(status) if status is not None else None
        root = self.layout.erasures_root(tenant)
        keys = [info.key for info in self.io.list(root) if info.key.endswith(".json")]

        def load(key: str) -> Receipt | None:
            found = self.io.get_model(key, Receipt)
            if found is None:
                return None
            found[0]._etag = found[1]
            return found[0]

        with ThreadPoolExecutor(max_workers=8) as pool:
            receipts = [r for r in pool.map(load, keys) if r is not None]
        if wanted is not None:
            receipts = [r for r in receipts if r.status == wanted]
        return sorted(receipts, key=lambda r: (r.created_at, r.request_id))

    # ================================================================ purge
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
        for kind, root, marker in (
            ("adapter-partial", self.layout.adapters_root(tenant), ADAPTER_MANIFEST),
            ("data-partial", self.layout.data_root(tenant), DATA_MANIFEST),
        ):
            groups: dict[str, list[Any]] = {}
            for info in self.io.list(root):
                name = self.layout.child_name(root, info.key)
                if name:
                    groups.setdefault(name, []).append(info)
            for version, infos in sorted(groups.items()):
                if version in protected or any(i.key == f"{root}{version}/{marker}" for i in infos):
                    continue
                infos = [i for i in infos if i.key != f"{root}{version}/{CLAIM_FILE}"]  # claims stay
                if not infos:
                    continue
                if max(i.last_modified for i in infos) > cutoff:
                    continue  # possibly an upload still in flight
                count = 0 if dry_run else self.io.delete_keys([i.key for i in infos])
                entries.append(PurgeEntry(kind=kind, version=version, key=f"{root}{version}/", objects=count,
                                          deleted_at=utcnow()))
        return entries

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
        latest: dict[str, bool] = {}  # key -> its latest entry is a delete marker
        versions: list[tuple[str, str, bool]] = []  # (key, version id, is latest)
        kwargs: dict[str, Any] = {"Bucket": self.settings.bucket, "Prefix": self.layout.tenant_dir(tenant)}
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
        doomed = [(key, version) for key, version, is_latest in versions
                  if not is_latest or latest.get(key, True)]  # a key whose latest is a marker goes whole
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

    def _manifests(self, tenant: str, kind: str) -> dict[str, Any]:
        versions = self.list_adapter_versions(tenant) if kind == "adapter" else self.list_data_versions(tenant)
        get = self.get_adapter_manifest if kind == "adapter" else self.get_data_manifest
        with ThreadPoolExecutor(max_workers=8) as pool:
            return dict(zip(versions, pool.map(lambda v: get(tenant, v), versions)))

    # ================================================================ API keys
    def issue_key(self, tenant: str, label: str | None = None) -> str:
        """A new API key for ``tenant``; only its salted hash is stored. Show it once."""
        api_key, stored = apikeys.new_key(tenant, label=label)
        self.update_tenant(tenant, lambda config: config.key_hashes.append(stored))
        logger.info("tenant %s: API key %s issued", tenant, stored.key_id)
        return api_key

    def list_keys(self, tenant: str) -> list[KeyHash]:
        return list(self.get_tenant(tenant).key_hashes)

    def revoke_key(self, tenant: str, key_id: str) -> bool:
        """Remove a key by its id; True if it existed."""
        removed: list[bool] = []

        def change(config: TenantConfig) -> None:
            before = len(config.key_hashes)
            config.key_hashes = [k for k in config.key_hashes if k.key_id != key_id]
            removed[:] = [len(config.key_hashes) != before]

        self.update_tenant(tenant, change)
        if removed and removed[0]:
            logger.info("tenant %s: API key %s revoked", tenant, key_id)
        return bool(removed and removed[0])

    def verify_key(self, tenant: str, api_key: str) -> bool:
        """True iff ``api_key`` is a current key of ``tenant`` (constant-time hash comparison).

        A key of another tenant, an unknown tenant or key id costs one scrypt too, so response
        times do not tell which tenants or key ids exist.
        """
        try:
            parsed = apikeys.parse_key(api_key)
        except AuthError:
            return False
        hashes: list[KeyHash] = []
        try:
            if parsed.tenant == validate_tenant_name(tenant):
                hashes = self.get_tenant(tenant).key_hashes
        except (TenantNotFoundError, ValueError):
            hashes = []
        return apikeys.match_key(api_key, hashes) is not None

    def authenticate(self, api_key: str) -> str:
        """The tenant a key belongs to; AuthError for anything else (malformed, unknown, revoked)."""
        parsed = apikeys.parse_key(api_key)
        if parsed.tenant is None or not self.verify_key(parsed.tenant, api_key):
            raise AuthError("invalid API key")
        return parsed.tenant

    def authorize(self, api_key: str, tenant: str) -> str:
        """'tenant' if the key is ``tenant``'s own, 'admin' for the admin key; else AuthError.

        The HTTP layer calls this before any access to ``tenant``'s data: another tenant's key
        never passes, whatever it holds.
        """
        validate_tenant_name(tenant)
        if isinstance(api_key, str) and api_key.startswith(apikeys.TENANT_KEY_PREFIX):
            if self.verify_key(tenant, api_key):
                return "tenant"
        elif self.verify_admin(api_key):
            return "admin"
        raise AuthError(f"this API key does not grant access to tenant {tenant!r}")

    def ensure_admin_key(self) -> str | None:
        """Create the admin key if none is configured; returns it once, else None.

        ``ERASER_ADMIN_KEY`` in the environment wins; otherwise the hash lives in ``admin.json``.
        """
        if os.environ.get(apikeys.ADMIN_KEY_ENV):
            return None
        api_key, stored = apikeys.new_key(None, label="admin")
        try:
            self.io.put_model(self.layout.admin(), stored, if_none_match=True)
        except PreconditionLost:
            return None
        logger.info("admin key %s created", stored.key_id)
        return api_key

    def rotate_admin_key(self) -> str:
        """Replace the stored admin key (the old one stops working); returns the new one once."""
        api_key, stored = apikeys.new_key(None, label="admin")
        self.io.put_model(self.layout.admin(), stored)
        return api_key

    def verify_admin(self, api_key: str) -> bool:
        """True iff ``api_key`` is the admin key (env ``ERASER_ADMIN_KEY`` or ``admin.json``)."""
        if not isinstance(api_key, str) or not api_key:
            return False
        configured = os.environ.get(apikeys.ADMIN_KEY_ENV)
        if configured:
            return apikeys.check_admin_env(api_key, configured)
        try:
            parsed = apikeys.parse_key(api_key)
        except AuthError:
            return False
        if parsed.tenant is not None:
            return False
        found = self.io.get_model(self.layout.admin(), KeyHash)
        return found is not None and apikeys.match_key(api_key, [found[0]]) is not None

    def require_admin(self, api_key: str) -> None:
        if not self.verify_admin(api_key):
            raise AuthError("admin key required")

    # ================================================================ internals
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

