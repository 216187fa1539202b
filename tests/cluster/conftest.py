"""Fixtures of the cluster tests: a tiny base model, tenants onboarded in-process, one torch thread."""

from __future__ import annotations

import uuid

import pytest
import torch

from tests.cluster.helpers import PIPELINE, build_base, create_tenant, tenant_records


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The machine has 2 shared cores: intra-op threads only add contention (measured 40x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    return build_base(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture
def grace0_settings(s3_server, s3_bucket, tmp_path):
    """Store settings on the session's SeaweedFS: a fresh prefix, private cache, purge grace 0."""
    return s3_server.settings(bucket=s3_bucket, prefix=f"c-{uuid.uuid4().hex[:10]}", cache_dir=tmp_path / "cache",
                              purge_grace_seconds=0)


@pytest.fixture
def namespace():
    """A Ray namespace per test: coordinator actors of one test are never reused by another."""
    return f"eraser-test-{uuid.uuid4().hex[:8]}"


def onboard_local(settings, tiny_base, tenants=("acme",)):
    """Tenants with data d000001 and adapter v000001 trained in-process; returns (store, records by tenant)."""
    from cluster import CoordinatorOptions, LocalErasureService
    from tenants.store import TenantStore

    store = TenantStore(settings)
    records = {}
    service = LocalErasureService(settings, options=CoordinatorOptions(pipeline=PIPELINE, purge_grace_seconds=0))
    for tenant in tenants:
        records[tenant] = tenant_records(tenant, seed=len(records))
        create_tenant(store, tenant, tiny_base, records[tenant])
        service.onboard(tenant)
    return store, records
