"""The only place S3 keys are built. Layout (docs/architecture.md#s3-layout; bucket and prefix configurable):

    <prefix>/models/<base-model-name>/...              base model (HF format)
    <prefix>/tenants/<t>/tenant.json                   recipe and API key hashes
    <prefix>/tenants/<t>/data/<data-version>/...       records (immutable once written)
    <prefix>/tenants/<t>/adapters/<version>/...        adapter versions (immutable once written)
    <prefix>/tenants/<t>/HEAD.json                     {"adapter": version, "data": data-version}
    <prefix>/tenants/<t>/erasures/<request_id>.json    ledger: request + receipt
    <prefix>/admin.json                                admin key hash (only if no ERASER_ADMIN_KEY)

Every name that becomes a key component is validated here, so no caller can build a key that
escapes its tenant's prefix (``../``, ``/``, empty, control characters).
"""

from __future__ import annotations

import re

from tenants.errors import (
    InvalidNameError,
    InvalidRequestIdError,
    InvalidTenantNameError,
    InvalidVersionError,
)

# Lowercase DNS-label-like: safe in keys, URLs, API keys (no "_", which separates key fields).
TENANT_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
ADAPTER_VERSION_RE = re.compile(r"^v[0-9]{6,}$")
DATA_VERSION_RE = re.compile(r"^d[0-9]{6,}$")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
# One path component of a file inside an adapter or model directory.
FILE_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+=-]{0,254}$")
MODEL_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

ADAPTER_VERSION_DIGITS = 6
TENANT_FILE = "tenant.json"
HEAD_FILE = "HEAD.json"
LEASE_FILE = "LEASE.json"  # the coordinator lease of a tenant (tenants.lease)
ADAPTER_MANIFEST = "eraser.json"
DATA_MANIFEST = "dataset.json"
MODEL_MANIFEST = "eraser-model.json"
ADMIN_FILE = "admin.json"


def validate_tenant_name(name: object) -> str:
    """Return ``name`` if it is a valid tenant name, else raise InvalidTenantNameError."""
    if not isinstance(name, str) or not TENANT_NAME_RE.fullmatch(name):
        raise InvalidTenantNameError(
            f"invalid tenant name {name!r}: use 1-63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return name


def validate_adapter_version(version: object) -> str:
    if not isinstance(version, str) or not ADAPTER_VERSION_RE.fullmatch(version):
        raise InvalidVersionError(f"invalid adapter version {version!r}: expected 'v' and 6+ digits, e.g. 'v000001'")
    return version


def validate_data_version(version: object) -> str:
    if not isinstance(version, str) or not DATA_VERSION_RE.fullmatch(version):
        raise InvalidVersionError(f"invalid data version {version!r}: expected 'd' and 6+ digits, e.g. 'd000001'")
    return version


def validate_request_id(request_id: object) -> str:
    if not isinstance(request_id, str) or not REQUEST_ID_RE.fullmatch(request_id):
        raise InvalidRequestIdError(
            f"invalid request_id {request_id!r}: use 1-128 characters of letters, digits and '._:-', "
            "starting with a letter or digit"
        )
    return request_id


def validate_relative_file(name: object) -> str:
    """A relative file path inside an adapter or model directory: '/'-separated safe parts."""
    if not isinstance(name, str) or not name or len(name) > 1024:
        raise InvalidNameError(f"invalid file name {name!r}")
    for part in name.split("/"):
        if part in ("", ".", "..") or not FILE_PART_RE.fullmatch(part):
            raise InvalidNameError(f"invalid file name {name!r}: bad path component {part!r}")
    return name


def validate_model_name(name: object) -> str:
    """A base model name: one or two safe components (``tiny-llama`` or ``org/model``)."""
    if not isinstance(name, str) or not name:
        raise InvalidNameError(f"invalid model name {name!r}")
    parts = name.split("/")
    if len(parts) > 2 or any(p in (".", "..") or not MODEL_PART_RE.fullmatch(p) for p in parts):
        raise InvalidNameError(
            f"invalid model name {name!r}: use 'name' or 'org/name' of letters, digits and '._-'"
        )
    return name


def adapter_version_name(number: int) -> str:
    return f"v{number:0{ADAPTER_VERSION_DIGITS}d}"


def data_version_name(number: int) -> str:
    return f"d{number:0{ADAPTER_VERSION_DIGITS}d}"


def version_number(version: str) -> int:
    """The integer of ``v000012`` / ``d000012`` (validated by the caller)."""
    return int(version[1:])


def normalize_prefix(prefix: str | None) -> str:
    """'' or 'a/b' (no leading/trailing slash); refuses '..' and empty components."""
    prefix = (prefix or "").strip("/")
    if not prefix:
        return ""
    for part in prefix.split("/"):
        if part in ("", ".", "..") or not FILE_PART_RE.fullmatch(part):
            raise InvalidNameError(f"invalid S3 prefix {prefix!r}: bad component {part!r}")
    return prefix


class S3Layout:
    """Builds every key of the store under one prefix. Directory-like keys end with '/'."""

    def __init__(self, prefix: str | None = "") -> None:
        self.prefix = normalize_prefix(prefix)

    def _key(self, *parts: str) -> str:
        return "/".join(([self.prefix] if self.prefix else []) + list(parts))

    # ---- store-wide
    def admin(self) -> str:
        return self._key(ADMIN_FILE)

    def models_root(self) -> str:
        return self._key("models") + "/"

    def model_dir(self, name: str) -> str:
        return self._key("models", validate_model_name(name)) + "/"

    def model_file(self, name: str, relative: str) -> str:
        return self.model_dir(name) + validate_relative_file(relative)

    def model_manifest(self, name: str) -> str:
        return self.model_dir(name) + MODEL_MANIFEST

    def tenants_root(self) -> str:
        return self._key("tenants") + "/"

    # ---- one tenant
    def tenant_dir(self, tenant: str) -> str:
        return self._key("tenants", validate_tenant_name(tenant)) + "/"

    def tenant_config(self, tenant: str) -> str:
        return self.tenant_dir(tenant) + TENANT_FILE

    def head(self, tenant: str) -> str:
        return self.tenant_dir(tenant) + HEAD_FILE

    def lease(self, tenant: str) -> str:
        return self.tenant_dir(tenant) + LEASE_FILE

    def data_root(self, tenant: str) -> str:
        return self.tenant_dir(tenant) + "data/"

    def data_dir(self, tenant: str, version: str) -> str:
        return self.data_root(tenant) + validate_data_version(version) + "/"

    def data_shard(self, tenant: str, version: str, index: int) -> str:
        return self.data_dir(tenant, version) + shard_name(index)

    def data_manifest(self, tenant: str, version: str) -> str:
        return self.data_dir(tenant, version) + DATA_MANIFEST

    def adapters_root(self, tenant: str) -> str:
        return self.tenant_dir(tenant) + "adapters/"

    def adapter_dir(self, tenant: str, version: str) -> str:
        return self.adapters_root(tenant) + validate_adapter_version(version) + "/"

    def adapter_file(self, tenant: str, version: str, relative: str) -> str:
        return self.adapter_dir(tenant, version) + validate_relative_file(relative)

    def adapter_manifest(self, tenant: str, version: str) -> str:
        return self.adapter_dir(tenant, version) + ADAPTER_MANIFEST

    def erasures_root(self, tenant: str) -> str:
        return self.tenant_dir(tenant) + "erasures/"

    def receipt(self, tenant: str, request_id: str) -> str:
        return self.erasures_root(tenant) + validate_request_id(request_id) + ".json"

    # ---- parsing keys back (listing)
    def child_name(self, root: str, key: str) -> str | None:
        """The first component of ``key`` below directory ``root``, or None if not below it."""
        if not key.startswith(root):
            return None
        rest = key[len(root):]
        return rest.split("/", 1)[0] or None


def shard_name(index: int) -> str:
    return f"part-{index:05d}.jsonl.gz"
