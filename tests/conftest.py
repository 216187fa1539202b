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


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray head for the whole session (``ray start --head``: own ports, own temp dir, auth off),
    with this process connected as a driver. Stopped by its own processes' ids, never ``ray stop``."""
    import os

    import ray

    from tests.cluster.ray_head import RayHead

    head = RayHead(num_cpus=2).start()
    previous = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = head.address
    try:
        ray.init(address=head.address, namespace="eraser-tests", log_to_driver=False)
        yield head
    finally:
        ray.shutdown()
        if previous is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = previous
        head.stop()
