"""Base models: uploaded once under ``models/<name>/`` and named by tenants (or a local path / ``s3://`` URI)."""

from __future__ import annotations

import logging
from pathlib import Path

from tenants.errors import ConflictError, VersionNotFoundError
from tenants.models import ModelManifest
from tenants.paths import MODEL_MANIFEST, validate_model_name
from tenants.s3io import PreconditionLost, local_files
from tenants.store.base import StoreBase

logger = logging.getLogger(__name__)


class BaseModelsMixin(StoreBase):
    """Uploading, listing and resolving base models."""

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
