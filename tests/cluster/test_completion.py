"""A published receipt becomes complete (``completed_at``) only once the coordinator checked its three
conditions: the records gone from HEAD's dataset, the versions that held them purged, every replica
switched. Each fault leaves it not complete with the failed check on the receipt, and a later reconciler
pass completes it once the fault is gone. Real SeaweedFS; the erasure job is the fake behind JobRunner."""

from __future__ import annotations

import time
import types

import pytest

from cluster import CoordinatorOptions, ErasureCoordinator
from cluster.reconciler import Reconciler
from tenants.models import Head, ReceiptStatus
from tenants.store import TenantStore
from tests.cluster.test_faults import FakeRunner, FaultyClient, lost
from tests.cluster.test_reconciler import Coordinators, request
from tests.tenants.helpers import onboard

pytestmark = pytest.mark.slow

NOW = CoordinatorOptions(purge_grace_seconds=0, warm_curvature=False, lease_ttl_s=5.0, redrive_after_s=0.3)


def switched_hook(tenant, head):
    return {"switched_at": "2030-01-01T00:00:00+00:00"}


def erase(store, tmp_path, options=NOW, hooks=()):
    """Onboard acme, erase user0's records (r0, r3) in one round; returns the receipt after it."""
    onboard(store, tmp_path)
    core = ErasureCoordinator("acme", store, FakeRunner(tmp_path), options, hooks=hooks)
    core.submit(request())
    core.run_until_idle()
    receipt = store.get_receipt("acme", "req-1")
    assert receipt.status == ReceiptStatus.published
    return receipt


def redrive(store, tmp_path, options=NOW, hooks=()):
    """One reconciler pass once the last check's backoff has passed; returns the receipt after it."""
    time.sleep(options.redrive_after_s + 0.1)
    started = Reconciler(store, Coordinators(store, FakeRunner(tmp_path), options, hooks), options).reconcile_once()
    assert "acme" in started
    return store.get_receipt("acme", "req-1")


def test_a_receipt_is_complete_once_all_three_checks_hold_and_says_what_was_checked(store, tmp_path):
    receipt = erase(store, tmp_path, hooks=[switched_hook])

    assert receipt.completed_at is not None and receipt.completion.ok
    assert receipt.completed_at == receipt.completion.checked_at >= receipt.published_at
    assert receipt.completion.records_gone.detail == "none of 2 erased record(s) in HEAD's data d000002"
    assert receipt.completion.versions_purged.detail.startswith("none of 1 adapter and 1 data version(s) holds them")
    assert receipt.completion.replicas_switched.detail.startswith("every serving replica switched at 2030-01-01")
    assert {(p.kind, p.version) for p in receipt.purged} == {("adapter", "v000001"), ("data", "d000001")}
    assert receipt.model_dump(mode="json")["completed_at"]  # what the CLI and the HTTP route show


def test_without_serving_hooks_it_completes_saying_no_replica_was_known(store, tmp_path):
    receipt = erase(store, tmp_path)

    assert receipt.completed_at is not None and receipt.replicas_switched_at is None
    assert receipt.completion.replicas_switched.detail == "no serving hook registered: no replica known to switch"


def test_a_purge_failure_leaves_it_not_complete_until_a_later_pass_purges(store, tmp_path):
    broken = {"on": True}

    def fault(operation, kwargs, seen):
        if broken["on"] and operation == "delete_objects":
            raise lost()

    faulty = TenantStore(store.settings, client=FaultyClient(store.client, fault))
    receipt = erase(faulty, tmp_path)

    assert receipt.purged == [] and receipt.completed_at is None
    assert receipt.completion.records_gone.ok and receipt.completion.replicas_switched.ok
    assert receipt.completion.versions_purged.model_dump() == {"ok": False, "detail": "still held by v000001, d000001"}

    broken["on"] = False
    receipt = redrive(faulty, tmp_path)
    assert receipt.purged and receipt.completed_at is not None and receipt.completion.ok


def test_a_missing_switch_leaves_it_not_complete_until_the_replicas_confirm(store, tmp_path):
    answers = [None]  # the board timed out: not every replica confirmed

    def hook(tenant, head):
        return answers[-1]

    receipt = erase(store, tmp_path, hooks=[hook])

    assert receipt.purged and receipt.replicas_switched_at is None and receipt.completed_at is None
    assert receipt.completion.versions_purged.ok and not receipt.completion.replicas_switched.ok

    answers.append({"switched_at": "2030-01-01T00:00:00+00:00"})
    receipt = redrive(store, tmp_path, hooks=[hook])
    assert receipt.replicas_switched_at is not None and receipt.completed_at is not None


def test_a_dataset_that_still_holds_an_erased_record_leaves_it_not_complete(store, tmp_path):
    options = CoordinatorOptions(purge_grace_seconds=1.0, warm_curvature=False, lease_ttl_s=5.0, redrive_after_s=0.3)
    erase(store, tmp_path, options)
    # an operator rolls HEAD back within the grace period: the live dataset holds the erased records again
    head, etag = store.get_head("acme")
    etag = store.move_head("acme", Head(adapter="v000001", data="d000001"), etag)
    time.sleep(1.0)

    receipt = redrive(store, tmp_path, options)
    assert receipt.completed_at is None
    assert receipt.completion.records_gone.model_dump() == {
        "ok": False, "detail": "2 of 2 erased record(s) in HEAD's data d000001"}

    store.move_head("acme", head, etag)  # rolled forward again
    receipt = redrive(store, tmp_path, options)
    assert receipt.completed_at is not None and receipt.completion.records_gone.ok
    assert store.list_data_versions("acme") == ["d000002"]


def test_a_check_that_cannot_read_the_dataset_records_nothing(store, tmp_path):
    broken = {"on": False}

    def fault(operation, kwargs, seen):
        if broken["on"] and operation == "get_object" and "/data/" in kwargs.get("Key", "") \
                and not kwargs["Key"].endswith("dataset.json"):
            raise lost()

    faulty = TenantStore(store.settings, client=FaultyClient(store.client, fault))
    options = CoordinatorOptions(purge_grace_seconds=0.5, warm_curvature=False, lease_ttl_s=5.0, redrive_after_s=0.3)
    erase(faulty, tmp_path, options)
    time.sleep(0.6)
    broken["on"] = True
    core = ErasureCoordinator("acme", faulty, FakeRunner(tmp_path), options)

    assert core.purge_due() and core.complete_due() == []
    receipt = faulty.get_receipt("acme", "req-1")
    assert receipt.completed_at is None and receipt.completion is None

    broken["on"] = False
    assert core.complete_due() == ["req-1"]


def test_a_switch_to_a_later_head_completes_an_earlier_receipt_whose_switch_was_never_confirmed(store, tmp_path):
    answers = [None]

    def hook(tenant, head):
        return answers[-1]

    erase(store, tmp_path, hooks=[hook])
    core = ErasureCoordinator("acme", store, FakeRunner(tmp_path), NOW, hooks=[hook])
    core.submit(request(request_id="req-2", subject="user1"))
    core.run_until_idle()
    assert all(store.get_receipt("acme", i).completed_at is None for i in ("req-1", "req-2"))

    answers.append({"switched_at": "2030-01-01T00:00:00+00:00"})  # every replica now serves v000003 only
    receipt = redrive(store, tmp_path, hooks=[hook])
    assert receipt.old_adapter_version == "v000001" and receipt.replicas_switched_at is not None
    assert receipt.completed_at is not None and store.get_receipt("acme", "req-2").completed_at is not None


def test_a_hook_registry_that_cannot_be_read_is_never_taken_for_no_hooks(store, tmp_path, monkeypatch):
    import cluster.actors as actors

    def unreachable(*args, **kwargs):
        raise TimeoutError("the registry actor did not answer (injected)")

    registry = types.SimpleNamespace(hooks=types.SimpleNamespace(remote=lambda: None))
    monkeypatch.setattr(actors, "_registry", lambda namespace, create: registry)
    monkeypatch.setattr(actors.ray, "get", unreachable)

    receipt = erase(store, tmp_path, hooks=lambda: actors.registered_hooks("eraser"))

    assert receipt.completed_at is None and receipt.replicas_switched_at is None
    assert not receipt.completion.replicas_switched.ok
