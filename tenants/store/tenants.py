"""Tenants: their configs (``tenant.json``, compare-and-swap updates) and the import of a tenant
with an adapter trained elsewhere."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tenants.errors import ConflictError, InvalidConfigError, TenantExistsError, TenantNotFoundError
from tenants.models import AdapterManifest, Head, Record, TenantConfig
from tenants.paths import validate_tenant_name
from tenants.records import imported_dataset
from tenants.s3io import PreconditionLost
from tenants.store.base import StoreBase, CLAIM_FILE, MAX_CAS_TRIES
from tenants.store.imports import ImportCheck, adapter_files

logger = logging.getLogger(__name__)


class TenantsMixin(StoreBase):
    """Creating, reading, updating and importing tenants."""

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
