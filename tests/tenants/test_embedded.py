"""The embedded SeaweedFS server: side-by-side instances, credentials, persistence, one per directory."""

from __future__ import annotations

import threading

import pytest
from pydantic import SecretStr

from tenants.embedded import EmbeddedS3, open_store
from tenants.errors import EmbeddedServerError, StoreError
from tenants.models import TenantConfig
from tenants.settings import StoreSettings
from tenants.store import TenantStore

pytestmark = pytest.mark.slow


def test_two_servers_side_by_side_and_restart_keeps_data(tmp_path):
    servers = [EmbeddedS3(tmp_path / name) for name in ("one", "two")]
    threads = [threading.Thread(target=server.start) for server in servers]
    [t.start() for t in threads]
    [t.join() for t in threads]
    try:
        assert all(s.running for s in servers)
        assert servers[0].endpoint != servers[1].endpoint
        assert not set(servers[0].ports.values()) & set(servers[1].ports.values())
        one = TenantStore(servers[0].settings(bucket="eraser", cache_dir=tmp_path / "c"))
        one.ensure_bucket()
        one.create_tenant(TenantConfig(name="acme", base_model="m"))
        two = TenantStore(servers[1].settings(bucket="eraser", cache_dir=tmp_path / "c"))
        two.ensure_bucket()
        assert two.list_tenants() == []  # separate data
        # wrong credentials are refused: the server enforces them
        wrong = TenantStore(servers[0].settings(bucket="eraser").model_copy(update={"secret_key": SecretStr("wrong")}))
        with pytest.raises(StoreError):
            wrong.list_tenants()
        # one server per data directory
        with pytest.raises(EmbeddedServerError, match="in use"):
            EmbeddedS3(tmp_path / "one").start()
    finally:
        threads = [threading.Thread(target=server.stop) for server in servers]
        [t.start() for t in threads]
        [t.join() for t in threads]
    assert not any(s.running for s in servers)
    with EmbeddedS3(tmp_path / "one", secret_key="a-new-secret") as again:  # new ports, new credentials
        store = TenantStore(again.settings(bucket="eraser", cache_dir=tmp_path / "c"))
        assert store.list_tenants() == ["acme"]


def test_open_store_uses_the_configured_endpoint(s3_server, monkeypatch, tmp_path):
    for name, value in {"ENDPOINT": s3_server.endpoint, "BUCKET": "eraser-open-store", "ACCESS_KEY": s3_server.access_key,
                        "SECRET_KEY": s3_server.secret_key, "CACHE_DIR": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(f"ERASER_S3_{name}", value)
    with open_store(data_dir=tmp_path / "unused") as store:
        assert store.settings.endpoint == s3_server.endpoint
        assert store.list_tenants() == []
    assert not (tmp_path / "unused").exists()  # no embedded server was started


def test_missing_binary_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ERASER_WEED", str(tmp_path / "no-weed"))
    with pytest.raises(EmbeddedServerError):
        EmbeddedS3(tmp_path / "x", weed=str(tmp_path / "no-weed")).start()


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("ERASER_S3_ENDPOINT", "http://127.0.0.1:1/")
    monkeypatch.setenv("ERASER_S3_BUCKET", "mine")
    monkeypatch.setenv("ERASER_S3_PREFIX", "/prod/eu/")
    monkeypatch.setenv("ERASER_S3_PURGE_GRACE_SECONDS", "5")
    settings = StoreSettings()
    assert (settings.endpoint, settings.bucket, settings.prefix, settings.purge_grace_seconds) == (
        "http://127.0.0.1:1", "mine", "prod/eu", 5.0)
    monkeypatch.setenv("ERASER_S3_ENDPOINT", "ftp://x")
    with pytest.raises(ValueError):
        StoreSettings()


def test_unreachable_endpoint_is_a_store_error(tmp_path):
    settings = StoreSettings(endpoint="http://127.0.0.1:9", access_key="a", secret_key="b", max_attempts=1,
                             connect_timeout=1, cache_dir=tmp_path)
    with pytest.raises(StoreError, match="cannot reach"):
        TenantStore(settings).list_tenants()
