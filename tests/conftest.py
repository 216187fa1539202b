"""Session-wide fixtures shared by every test package (one S3 server per session, ...)."""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS via tenants.EmbeddedS3) on free loopback ports, for the session."""
    from tenants.embedded import EmbeddedS3

    with EmbeddedS3(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(scope="session")
def s3_bucket(s3_server):
    """One bucket for the session; tests isolate themselves by key prefix (see ``store``)."""
    from tenants.store import TenantStore

    settings = s3_server.settings(bucket="eraser-tests")
    TenantStore(settings).ensure_bucket()
    return settings.bucket


@pytest.fixture
def store(s3_server, s3_bucket, tmp_path):
    """A TenantStore of its own: a fresh key prefix in the session bucket and a private cache."""
    from tenants.store import TenantStore

    settings = s3_server.settings(bucket=s3_bucket, prefix=f"t-{uuid.uuid4().hex[:12]}", cache_dir=tmp_path / "cache")
    return TenantStore(settings)
