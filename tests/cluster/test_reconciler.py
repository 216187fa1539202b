"""The reconciler (issue 15, defect 4): work that lost its trigger is resumed, transient failures are
retried with bounded backoff (each attempt recorded), purges and replica switches are re-driven. Real
SeaweedFS; the erasure job is the fake of tests/cluster/test_faults.py behind the JobRunner seam."""

from __future__ import annotations

import time
from datetime import datetime

import pytest

from cluster import CoordinatorOptions, ErasureCoordinator
from cluster.errors import JobFailedError
from cluster.jobs import JobResult
from cluster.reconciler import Reconciler, due_work
from tenants.lease import TenantLease
from tenants.models import ErasureRequest, ReceiptStatus
from tests.cluster.test_faults import FakeRunner
from tests.tenants.helpers import onboard

pytestmark = pytest.mark.slow

OPTIONS = CoordinatorOptions(purge_grace_seconds=0, warm_curvature=False, lease_ttl_s=5.0, lease_wait_s=0.5,
                             max_attempts=3, retry_backoff_s=0.3, retry_backoff_max_s=0.5)


def request(tenant="acme", request_id="req-1", subject="user0"):
    return ErasureRequest(request_id=request_id, tenant=tenant, kind="remove", subjects=[subject])


class Coordinators:
    """run_tenant for the reconciler: one in-process coordinator per tenant, kept."""

    def __init__(self, store, runner, options=OPTIONS, hooks=()):
        self.store, self.runner, self.options, self.hooks = store, runner, options, hooks
        self.cores: dict[str, ErasureCoordinator] = {}

    def __call__(self, tenant):
        if tenant not in self.cores:
            self.cores[tenant] = ErasureCoordinator(tenant, self.store, self.runner, self.options, hooks=self.hooks)
        return self.cores[tenant].run_until_idle()


class FailingRunner(FakeRunner):
    """Fails its first ``failures`` jobs the way a lost Ray worker does, then erases."""

    def __init__(self, root, failures):
        super().__init__(root)
        self.failures = failures

    def run_erasure_job(self, job):
        if self.failures > 0:
            self.failures -= 1
            self.runs.append(list(job.request_ids))
            raise JobFailedError("Ray task for the erasure job failed: worker died (injected)")
        return super().run_erasure_job(job)


def test_requests_that_never_reached_a_coordinator_are_run_at_start_for_every_tenant(store, tmp_path):
    for tenant in ("acme", "globex"):
        onboard(store, tmp_path, tenant)
        store.submit_erasure(request(tenant), validate=False)  # recorded; the hand-off to the backend lost
    runner = FakeRunner(tmp_path)
    reconciler = Reconciler(store, Coordinators(store, runner), OPTIONS)

    started = reconciler.reconcile_once()

    assert sorted(started) == ["acme", "globex"] and all("1 pending" in r for r in started.values())
    for tenant in ("acme", "globex"):
        receipt = store.get_receipt(tenant, "req-1")
        assert receipt.status == ReceiptStatus.published and receipt.new_adapter_version == "v000002"
        assert store.list_adapter_versions(tenant) == ["v000002"]  # purged too (grace 0)
    assert reconciler.reconcile_once() == {}  # nothing left: the next pass starts nothing


def test_running_work_is_taken_over_only_after_its_owners_lease_lapsed(store, tmp_path):
    onboard(store, tmp_path)
    store.submit_erasure(request(), validate=False)
    dead = TenantLease(store, "acme", ttl_s=1.0)
    dead.acquire()
    dead.pause_renewals()  # its process died mid-round: the lease is never renewed nor released
    store.update_receipt("acme", "req-1", lambda r: r.transition(ReceiptStatus.running, lease_token=dead.token))
    runner = FakeRunner(tmp_path)
    reconciler = Reconciler(store, Coordinators(store, runner), OPTIONS)

    assert reconciler.reconcile_once() == {} and runner.runs == []  # its owner may still be alive
    time.sleep(1.2)
    started = reconciler.reconcile_once()

    assert "1 running with no live owner" in started["acme"] and runner.runs == [["req-1"]]
    receipt = store.get_receipt("acme", "req-1")
    assert receipt.status == ReceiptStatus.published and receipt.lease_token == dead.token + 1


def test_transient_failures_are_retried_with_bounded_backoff_and_every_attempt_recorded(store, tmp_path):
    onboard(store, tmp_path)
    store.submit_erasure(request(), validate=False)
    runner = FailingRunner(tmp_path, failures=2)
    reconciler = Reconciler(store, Coordinators(store, runner), OPTIONS)

    reconciler.reconcile_once()  # attempt 1 fails
    first = store.get_receipt("acme", "req-1")
    assert first.status == ReceiptStatus.failed and len(first.attempts) == 1 and first.attempts[0]["transient"]
    assert reconciler.reconcile_once() == {}  # its backoff (0.3 s) has not passed
    deadline = time.monotonic() + 10
    while store.get_receipt("acme", "req-1").status != ReceiptStatus.published and time.monotonic() < deadline:
        time.sleep(0.1)
        reconciler.reconcile_once()

    receipt = store.get_receipt("acme", "req-1")
    assert receipt.status == ReceiptStatus.published and runner.runs == [["req-1"]] * 3
    assert len(receipt.attempts) == 2 and all(a["transient"] and "worker died" in a["error"] for a in receipt.attempts)
    gaps = [datetime.fromisoformat(a["retried_at"]).timestamp() - datetime.fromisoformat(a["at"]).timestamp()
            for a in receipt.attempts]
    assert gaps[0] >= 0.3 and gaps[1] >= 0.5 - 1e-3  # 0.3 s, then 0.6 s capped at 0.5 s


def test_retries_stop_after_max_attempts_and_a_refusal_by_the_method_is_final(store, tmp_path):
    onboard(store, tmp_path)
    store.submit_erasure(request(), validate=False)
    runner = FailingRunner(tmp_path, failures=99)
    reconciler = Reconciler(store, Coordinators(store, runner), OPTIONS)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(runner.runs) < 4:
        reconciler.reconcile_once()
        time.sleep(0.1)
    receipt = store.get_receipt("acme", "req-1")
    assert receipt.status == ReceiptStatus.failed and len(receipt.attempts) == 3 == len(runner.runs)

    class Refusing(FakeRunner):
        def run_erasure_job(self, job):
            self.runs.append(list(job.request_ids))
            return JobResult(body={"status": "rejected", "error": "guard: retained loss bound exceeded"})

    store.submit_erasure(request(request_id="req-2", subject="user1"), validate=False)
    refusing = Refusing(tmp_path)
    reconciler = Reconciler(store, Coordinators(store, refusing), OPTIONS)
    reconciler.reconcile_once()
    time.sleep(0.6)
    reconciler.reconcile_once()
    refused = store.get_receipt("acme", "req-2")
    assert refused.status == ReceiptStatus.failed and refused.attempts[-1]["transient"] is False
    assert refusing.runs == [["req-2"]]  # never retried


def test_purges_past_their_grace_and_unconfirmed_replica_switches_are_redriven(store, tmp_path):
    onboard(store, tmp_path)
    answers = [None]  # the first notification times out on the board; later ones confirm

    def hook(tenant, head):
        return answers[-1]

    options = CoordinatorOptions(purge_grace_seconds=1.0, warm_curvature=False, lease_ttl_s=5.0, redrive_after_s=0.5)
    run = Coordinators(store, FakeRunner(tmp_path), options, hooks=[hook])
    core = ErasureCoordinator("acme", store, FakeRunner(tmp_path), options, hooks=[hook])
    core.submit(request())
    core.run_until_idle()
    receipt = store.get_receipt("acme", "req-1")
    assert receipt.status == ReceiptStatus.published and receipt.purged == [] and receipt.replicas_switched_at is None
    assert store.list_adapter_versions("acme") == ["v000001", "v000002"]  # within its grace period
    reconciler = Reconciler(store, run, options)
    assert reconciler.reconcile_once() == {}

    time.sleep(1.1)
    answers.append({"switched_at": "2030-01-01T00:00:00+00:00"})
    assert due_work(store, "acme", options)
    started = reconciler.reconcile_once()

    assert any("purge due" in r for r in started["acme"]) and any("replica" in r for r in started["acme"])
    receipt = store.get_receipt("acme", "req-1")
    assert {(p.kind, p.version) for p in receipt.purged} == {("adapter", "v000001"), ("data", "d000001")}
    assert receipt.replicas_switched_at is not None
    assert reconciler.reconcile_once() == {}
