"""The CLI's world: the session's S3 server under a fresh prefix, as the CLI reads it from the environment."""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture
def cli_store(s3_server, s3_bucket, monkeypatch, tmp_path):
    """Points the CLI (ERASER_S3_* variables) at the session server under a fresh prefix; returns a store on it."""
    from tenants.store import TenantStore

    prefix = f"cli-{uuid.uuid4().hex[:8]}"
    for name, value in {"ENDPOINT": s3_server.endpoint, "BUCKET": s3_bucket, "PREFIX": prefix,
                        "ACCESS_KEY": s3_server.access_key, "SECRET_KEY": s3_server.secret_key,
                        "CACHE_DIR": str(tmp_path / "cache"), "PURGE_GRACE_SECONDS": "0"}.items():
        monkeypatch.setenv(f"ERASER_S3_{name}", value)
    return TenantStore(s3_server.settings(bucket=s3_bucket, prefix=prefix, cache_dir=tmp_path / "cache",
                                          purge_grace_seconds=0))
