"""Retention: which superseded versions purge deletes, and when (lineage rule + real S3)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tenants.models import AdapterManifest, DataManifest, utcnow
from tenants.retention import plan_purge

from tests.tenants.helpers import erase_r1


def data(version, parent=None, requests=()):
    return DataManifest(version=version, tenant="acme", parent=parent, request_ids=list(requests), records=1)


def adapter(version, parent=None, data_version=None, requests=()):
    return AdapterManifest(version=version, parent_version=parent, data_version=data_version, request_ids=list(requests))


NOW = utcnow()
GRACE = timedelta(seconds=60)


def test_plan_lineage_rule():
    datasets = {"d000001": data("d000001"), "d000002": data("d000002", "d000001", ["r1"]),
                "d000003": data("d000003", "d000002", ["r2"])}
    adapters = {"v000001": adapter("v000001", None, "d000001"),
                "v000002": adapter("v000002", "v000001", "d000002", ["r1"]),
                # retrained from scratch on clean data: no parent, holds nothing erased
                "v000003": adapter("v000003", None, "d000003"),
                # a stray adapter built from the old one, never erased r1
                "v000004": adapter("v000004", "v000001", None)}
    published = {"r1": NOW - timedelta(hours=1), "r2": NOW - timedelta(seconds=5)}
    plan = plan_purge(adapters, datasets, published, {"v000003", "d000003"}, NOW, GRACE)
    # r2 is still inside its grace period: only r1 counts
    assert [(c.kind, c.version, c.request_ids) for c in plan] == [
        ("adapter", "v000001", ("r1",)), ("adapter", "v000004", ("r1",)), ("data", "d000001", ("r1",)),
    ]
    later = plan_purge(adapters, datasets, published, {"v000003", "d000003"}, NOW + timedelta(minutes=2), GRACE)
    assert {(c.kind, c.version) for c in later} == {
        ("adapter", "v000001"), ("adapter", "v000002"), ("adapter", "v000004"), ("data", "d000001"), ("data", "d000002"),
    }


def test_plan_keeps_everything_without_published_erasures():
    datasets = {"d000001": data("d000001"), "d000002": data("d000002")}
    adapters = {"v000001": adapter("v000001", None, "d000001")}
    assert plan_purge(adapters, datasets, {}, {"d000002"}, NOW, GRACE) == []


def test_plan_never_touches_protected_and_survives_cycles():
    adapters = {"v000001": adapter("v000001", "v000002"), "v000002": adapter("v000002", "v000001")}
    plan = plan_purge(adapters, {}, {"r1": NOW - timedelta(days=1)}, {"v000002"}, NOW, GRACE)
    assert [c.version for c in plan] == ["v000001"]


@pytest.mark.slow
def test_purge_after_an_erasure(store, tmp_path):
    d1, v1, d2, v2 = erase_r1(store, tmp_path)
    assert "r1" not in {r.id for r in store.iter_dataset("acme", d2)}

    # within the grace period nothing goes (rollback stays possible)
    assert store.purge("acme", v2, d2) == []
    assert store.purge("acme", v2, d2, older_than=3600, now=utcnow() + timedelta(minutes=30)) == []
    # a dry run reports without deleting
    planned = store.purge("acme", v2, d2, older_than=0, dry_run=True)
    assert {(e["kind"], e["version"]) for e in planned} == {("adapter", v1), ("data", d1)}
    assert store.list_adapter_versions("acme") == [v1, v2]
    # HEAD's versions are protected even when the caller names others to keep
    assert store.purge("acme", v1, d1, older_than=timedelta(0)) == []
    entries = store.purge("acme", v2, d2, older_than=0)
    assert store.list_adapter_versions("acme") == [v2]
    assert store.list_data_versions("acme") == [d2]
    assert all(e["request_ids"] == ["req-1"] and e["objects"] > 0 for e in entries)
    leftover = [i.key for i in store.io.list(store.layout.adapter_dir("acme", v1))]
    assert [k.rsplit("/", 1)[1] for k in leftover] == ["_claim.json"]

    assert store.record_purge("acme", entries) == ["req-1"]
    logged = store.get_receipt("acme", "req-1")
    assert {(p.kind, p.version) for p in logged.purged} == {("adapter", v1), ("data", d1)}
    assert store.next_adapter_version("acme") == "v000003"  # purged numbers are not reused
