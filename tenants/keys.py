"""API keys: generated with ``secrets``, stored only as salted scrypt hashes, compared in constant time.

Formats (the tenant name never contains '_', key ids are hex, so the fields split unambiguously):

    tenant key   ek_<tenant>_<key_id>_<secret>     e.g. ek_acme_3f9a1c2e_Vb1...  (secret: 32 random bytes)
    admin key    eka_<key_id>_<secret>

The key id is public: it picks the one stored hash to check, so verifying costs one scrypt.
The admin key comes from ``ERASER_ADMIN_KEY`` when set, else from a hash in ``<prefix>/admin.json``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from tenants.errors import AuthError
from tenants.models import KeyHash
from tenants.paths import TENANT_NAME_RE

TENANT_KEY_PREFIX = "ek_"
ADMIN_KEY_PREFIX = "eka_"
ADMIN_KEY_ENV = "ERASER_ADMIN_KEY"
_KEY_ID_RE = re.compile(r"^[0-9a-f]{8}$")
_SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{32,128}$")

# scrypt cost: ~16 MiB and a few tens of ms per verification. API keys carry 256 random bits, so
# the hash only has to make a leaked tenant.json useless, not resist guessing of weak passwords.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


@dataclass(frozen=True)
class ParsedKey:
    tenant: str | None  # None for the admin key
    key_id: str
    secret: str


def parse_key(api_key: str) -> ParsedKey:
    """Split a key into its fields, AuthError if it is not a well-formed eraser key."""
    if not isinstance(api_key, str) or len(api_key) > 256:
        raise AuthError("malformed API key")
    if api_key.startswith(ADMIN_KEY_PREFIX):
        parts = api_key[len(ADMIN_KEY_PREFIX):].split("_", 1)
        tenant = None
    elif api_key.startswith(TENANT_KEY_PREFIX):
        head = api_key[len(TENANT_KEY_PREFIX):].split("_", 1)
        if len(head) != 2 or not TENANT_NAME_RE.fullmatch(head[0]):
            raise AuthError("malformed API key")
        tenant = head[0]
        parts = head[1].split("_", 1)
    else:
        raise AuthError("malformed API key (expected 'ek_<tenant>_...' or 'eka_...')")
    if len(parts) != 2 or not _KEY_ID_RE.fullmatch(parts[0]) or not _SECRET_RE.fullmatch(parts[1]):
        raise AuthError("malformed API key")
    return ParsedKey(tenant=tenant, key_id=parts[0], secret=parts[1])


def new_key(tenant: str | None, label: str | None = None) -> tuple[str, KeyHash]:
    """A fresh key for ``tenant`` (None = admin) and the hash to store. Show the key once."""
    key_id = secrets.token_hex(4)
    secret = secrets.token_urlsafe(32)
    if tenant is None:
        api_key = f"{ADMIN_KEY_PREFIX}{key_id}_{secret}"
    else:
        api_key = f"{TENANT_KEY_PREFIX}{tenant}_{key_id}_{secret}"
    return api_key, hash_key(api_key, key_id, label=label)


def hash_key(api_key: str, key_id: str, label: str | None = None) -> KeyHash:
    salt = secrets.token_bytes(16)
    digest = _scrypt(api_key, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return KeyHash(key_id=key_id, salt=salt.hex(), hash=digest.hex(), n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, label=label)


def check_key(api_key: str, stored: KeyHash) -> bool:
    """Constant-time comparison of scrypt(api_key) with a stored hash."""
    digest = _scrypt(api_key, bytes.fromhex(stored.salt), stored.n, stored.r, stored.p)
    return hmac.compare_digest(digest, bytes.fromhex(stored.hash))


_DUMMY = KeyHash(key_id="00000000", salt="00" * 16, hash="00" * 32)


def match_key(api_key: str, hashes: list[KeyHash]) -> KeyHash | None:
    """The stored hash this key matches (selected by key id), or None.

    Without a hash of that id it still runs one scrypt (on a dummy), keeping timing uniform.
    """
    parsed = parse_key(api_key)
    for stored in hashes:
        if hmac.compare_digest(stored.key_id, parsed.key_id):
            return stored if check_key(api_key, stored) else None
    check_key(api_key, _DUMMY)
    return None


def check_admin_env(api_key: str, expected: str) -> bool:
    """Constant-time comparison with the ``ERASER_ADMIN_KEY`` value (any length)."""
    return hmac.compare_digest(
        hashlib.sha256(api_key.encode()).digest(), hashlib.sha256(expected.encode()).digest()
    )


def _scrypt(api_key: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(api_key.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * 1024 * 1024, dklen=32)
