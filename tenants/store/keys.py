"""API keys in the store: tenant keys and the admin key, kept as salted scrypt hashes (``tenants.keys``)."""

from __future__ import annotations

import logging
import os

from tenants import keys as apikeys
from tenants.errors import AuthError, TenantNotFoundError
from tenants.models import KeyHash, TenantConfig
from tenants.paths import validate_tenant_name
from tenants.s3io import PreconditionLost
from tenants.store.base import StoreBase

logger = logging.getLogger(__name__)


class KeysMixin(StoreBase):
    """Issuing, revoking and checking API keys."""

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
