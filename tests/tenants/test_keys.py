"""API keys: format, hashing, and tenant isolation through the store."""

from __future__ import annotations

import pytest

from tenants import keys
from tenants.errors import AuthError, InvalidTenantNameError
from tenants.models import TenantConfig


def test_key_format_and_hash_round_trip():
    api_key, stored = keys.new_key("acme", label="ci")
    assert api_key.startswith("ek_acme_") and len(api_key) > 50
    parsed = keys.parse_key(api_key)
    assert (parsed.tenant, parsed.key_id) == ("acme", stored.key_id)
    assert parsed.secret not in stored.model_dump_json() and api_key not in stored.model_dump_json()
    assert keys.check_key(api_key, stored)
    assert not keys.check_key(api_key[:-1] + ("A" if api_key[-1] != "A" else "B"), stored)
    assert keys.match_key(api_key, [stored]) == stored
    other, _ = keys.new_key("acme")
    assert keys.match_key(other, [stored]) is None
    admin, admin_hash = keys.new_key(None)
    assert admin.startswith("eka_") and keys.parse_key(admin).tenant is None


@pytest.mark.parametrize("bad", ["", "nope", "ek_", "ek_acme", "ek_acme_zzzzzzzz_" + "a" * 40, "ek_ACME_0123abcd_" + "a" * 40,
                                 "ek_../x_0123abcd_" + "a" * 40, "eka_0123abcd_short", "x" * 300, None])
def test_malformed_keys(bad):
    with pytest.raises(AuthError):
        keys.parse_key(bad)


@pytest.mark.slow
def test_tenant_isolation(store, monkeypatch):
    monkeypatch.delenv(keys.ADMIN_KEY_ENV, raising=False)
    for name in ("acme", "beta"):
        store.create_tenant(TenantConfig(name=name, base_model="m"))
    key_a = store.issue_key("acme", label="app")
    key_b = store.issue_key("beta")
    raw = store.io.get_bytes(store.layout.tenant_config("acme"))[0].decode()
    assert key_a not in raw and keys.parse_key(key_a).secret not in raw  # only the hash is stored

    assert store.authenticate(key_a) == "acme" and store.authenticate(key_b) == "beta"
    assert store.authorize(key_a, "acme") == "tenant"
    assert store.verify_key("acme", key_a) and not store.verify_key("beta", key_a)
    with pytest.raises(AuthError):
        store.authorize(key_a, "beta")  # another tenant's key
    parsed = keys.parse_key(key_a)
    forged = f"ek_beta_{parsed.key_id}_{parsed.secret}"  # acme's secret relabelled as beta's
    with pytest.raises(AuthError):
        store.authorize(forged, "beta")
    with pytest.raises(AuthError):
        store.authenticate(forged)
    with pytest.raises(AuthError):
        store.authenticate(key_a[:-2] + "xx")  # wrong secret
    with pytest.raises(AuthError):
        store.authorize("ek_nobody_0123abcd_" + "a" * 43, "nobody")
    with pytest.raises(InvalidTenantNameError):
        store.authorize(key_a, "../acme")  # a bad name is refused before any key check
    assert [k.label for k in store.list_keys("acme")] == ["app"]

    assert store.revoke_key("acme", parsed.key_id)
    assert not store.revoke_key("acme", parsed.key_id)
    with pytest.raises(AuthError):
        store.authenticate(key_a)


@pytest.mark.slow
def test_admin_key_stored_hashed(store, monkeypatch):
    monkeypatch.delenv(keys.ADMIN_KEY_ENV, raising=False)
    store.create_tenant(TenantConfig(name="acme", base_model="m"))
    tenant_key = store.issue_key("acme")
    admin = store.ensure_admin_key()
    assert admin and store.ensure_admin_key() is None  # shown once
    assert admin not in store.io.get_bytes(store.layout.admin())[0].decode()
    assert store.verify_admin(admin) and store.authorize(admin, "acme") == "admin"
    assert not store.verify_admin(tenant_key) and not store.verify_admin("") and not store.verify_admin("eka_x")
    with pytest.raises(AuthError):
        store.require_admin(tenant_key)
    rotated = store.rotate_admin_key()
    assert store.verify_admin(rotated) and not store.verify_admin(admin)


@pytest.mark.slow
def test_admin_key_from_environment(store, monkeypatch):
    monkeypatch.setenv(keys.ADMIN_KEY_ENV, "let-me-in-please")
    assert store.ensure_admin_key() is None
    assert store.verify_admin("let-me-in-please")
    assert not store.verify_admin("let-me-in-pleasE")
    store.require_admin("let-me-in-please")
