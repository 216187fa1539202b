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


class RecordedMetrics:
    """What ``cluster.metrics.emit`` recorded, as (kind, name, value, tags) in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, float, dict]] = []

    def values(self, name: str, **tags: str) -> list[float]:
        return [v for _, n, v, t in self.events if n == name and all(t.get(k) == w for k, w in tags.items())]

    def tags(self, name: str, key: str) -> set[str]:
        return {t[key] for _, n, _, t in self.events if n == name and key in t}


@pytest.fixture
def recorded_metrics(monkeypatch):
    """Every metric the code under test records, outside Ray (where ``emit`` is otherwise a no-op)."""
    import cluster.metrics

    recorded = RecordedMetrics()

    class Recorder:
        def __init__(self, kind: str, name: str) -> None:
            self.kind, self.name = kind, name

        def _record(self, value: float, tags: dict) -> None:
            recorded.events.append((self.kind, self.name, value, dict(tags)))

        inc = set = observe = _record

    monkeypatch.setattr(cluster.metrics, "_metric", lambda kind, name, description, tag_keys: Recorder(kind, name))
    return recorded
