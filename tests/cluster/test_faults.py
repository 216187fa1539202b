"""Fault injection on the coordinator (issue 15): receipts stay true when S3 writes fail or are resent,
when a second coordinator appears, and when a job hangs. Real SeaweedFS underneath; the erasure job is
a fake behind the JobRunner seam (it writes an adapter directory, no model), and for the timeouts Ray
itself is a fake whose waits never end."""

from __future__ import annotations

import contextlib
import sys
import tempfile
import threading
import types
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from botocore.exceptions import EndpointConnectionError

from cluster import CoordinatorOptions, ErasureCoordinator, JobRunner
from cluster.config import RunnerSpec
from cluster.jobs import JobResult
from tenants.errors import LeaseHeldError
from tenants.models import ReceiptStatus
from tenants.store import TenantStore
from tests.tenants.helpers import adapter_dir, onboard

pytestmark = pytest.mark.slow

OPTIONS = CoordinatorOptions(purge_grace_seconds=0, warm_curvature=False, lease_ttl_s=5.0, lease_wait_s=0.5)
REQUEST = {"request_id": "req-1", "tenant": "acme", "kind": "remove", "subjects": ["user0"]}


class FakeRunner(JobRunner):
    """An erasure job that 'solves' instantly: a fresh adapter directory, status ok. With ``gate`` it
    waits for the gate first (a job that is still running), with ``entered`` set when it starts."""

    def __init__(self, root: Path, gate: threading.Event | None = None) -> None:
        self.root, self.gate = root, gate
        self.entered = threading.Event()
        self.runs: list[list[str]] = []

    def run_erasure_job(self, job):
        self.runs.append(list(job.request_ids))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(60), "the test never opened the gate"
        workdir = Path(tempfile.mkdtemp(dir=self.root))
        adapter_dir(workdir, weights=f"erased {job.job_id}".encode(), name="adapter")
        return JobResult(body={"status": "ok", "path": "influence", "solver": {"converged": True}, "checks": {}},
                         workdir=workdir)

    def run_training_job(self, job):
        raise AssertionError("training")

    def run_curvature_job(self, job):
        raise AssertionError("curvature")


class FaultyClient:
    """Wraps a boto3 client; ``fault(operation, kwargs, seen)`` is called before each call and may
    raise (``seen``: the (operation, key) of every call that went through)."""

    def __init__(self, real: Any, fault: Callable[[str, dict, list], None]) -> None:
        self._real, self._fault = real, fault
        self.seen: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._real, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            self._fault(name, kwargs, self.seen)
            answer = attribute(*args, **kwargs)
            self.seen.append((name, kwargs.get("Key", "")))
            return answer

        return call


def lost() -> Exception:
    return EndpointConnectionError(endpoint_url="http://injected-fault")


def head_moved(seen: list) -> bool:
    return any(op == "put_object" and key.endswith("HEAD.json") for op, key in seen)


def onboarded(store, tmp_path):
    onboard(store, tmp_path)  # acme: d000001 (r0..r5, subjects user0..user2), v000001, HEAD
    return store


# ---------------------------------------------------------------- defect 1: live but recorded as failed
def test_a_receipt_write_lost_after_head_moved_still_ends_published_and_purged(store, tmp_path):
    onboarded(store, tmp_path)
    failures = []

    def fault(op, kwargs, seen):  # the first receipt write after HEAD moved is lost, once
        if (op == "put_object" and "/erasures/req-1" in kwargs["Key"] and head_moved(seen) and not failures):
            failures.append(kwargs["Key"])
            raise lost()

    faulty = TenantStore(store.settings, client=FaultyClient(store.client, fault))
    core = ErasureCoordinator("acme", faulty, FakeRunner(tmp_path), OPTIONS)
    core.submit(REQUEST)

    reports = core.run_until_idle()

    assert failures and [r.status for r in reports] == ["published"]
    receipt = store.get_receipt("acme", "req-1")
    head, _ = store.get_head("acme")
    assert receipt.status == ReceiptStatus.published and receipt.error is None
    assert (receipt.new_adapter_version, receipt.new_data_version) == (head.adapter, head.data) == ("v000002", "d000002")
    assert {(p.kind, p.version) for p in receipt.purged} == {("adapter", "v000001"), ("data", "d000001")}
    assert store.list_adapter_versions("acme") == ["v000002"] and store.list_data_versions("acme") == ["d000002"]


def test_receipts_unwritable_after_head_moved_stay_running_never_failed_and_recovery_completes_them(store, tmp_path):
    onboarded(store, tmp_path)
    broken = {"on": True}

    def fault(op, kwargs, seen):  # S3 refuses receipt writes from the HEAD move until the fault clears
        if broken["on"] and op == "put_object" and "/erasures/" in kwargs["Key"] and head_moved(seen):
            raise lost()

    faulty = TenantStore(store.settings, client=FaultyClient(store.client, fault))
    core = ErasureCoordinator("acme", faulty, FakeRunner(tmp_path), OPTIONS)
    core.submit(REQUEST)

    reports = core.run_until_idle()  # does not raise: the batch is live

    assert [r.status for r in reports] == ["published"] and "recovery" in reports[0].error
    assert store.get_receipt("acme", "req-1").status == ReceiptStatus.running  # not 'failed': it is live
    assert store.get_head("acme")[0].adapter == "v000002"

    broken["on"] = False
    core.run_until_idle()  # the next round (or the reconciler) completes and purges it

    receipt = store.get_receipt("acme", "req-1")
    assert receipt.status == ReceiptStatus.published and receipt.new_adapter_version == "v000002"
    assert {(p.kind, p.version) for p in receipt.purged} == {("adapter", "v000001"), ("data", "d000001")}
    assert store.list_adapter_versions("acme") == ["v000002"]


# ---------------------------------------------------------------- defect 2: a resent HEAD move
def test_a_resent_head_move_publishes_instead_of_requeueing_and_rejecting(store, tmp_path):
    onboarded(store, tmp_path)
    real_put = store.client.put_object

    class Resending:
        def __getattr__(self, name):
            if name != "put_object":
                return getattr(store.client, name)

            def put_object(**kwargs):
                if kwargs["Key"].endswith("HEAD.json") and "IfMatch" in kwargs:
                    real_put(**kwargs)  # succeeded, response lost; botocore resends it
                return real_put(**kwargs)

            return put_object

    core = ErasureCoordinator("acme", TenantStore(store.settings, client=Resending()), FakeRunner(tmp_path), OPTIONS)
    core.submit(REQUEST)

    assert [r.status for r in core.run_until_idle()] == ["published"]
    receipt = store.get_receipt("acme", "req-1")
    assert receipt.status == ReceiptStatus.published and receipt.new_adapter_version == store.get_head("acme")[0].adapter


# ---------------------------------------------------------------- defect 3: two coordinators, one tenant
@contextlib.contextmanager
def held_in_background(coordinator: ErasureCoordinator, runner: FakeRunner) -> Iterator[dict]:
    """Submit REQUEST and run ``coordinator`` in a thread until its job is held at ``runner``'s gate; the
    block runs while it is held, and on leaving the gate opens and the thread is joined. Yields the dict
    that gets ``"reports"``, what ``run_until_idle`` returned."""
    coordinator.submit(REQUEST)
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("reports", coordinator.run_until_idle()))
    thread.start()
    try:
        assert runner.entered.wait(30)
        yield outcome
    finally:
        runner.gate.set()
        thread.join(60)


def test_a_second_coordinator_refuses_while_the_first_holds_the_lease(store, tmp_path):
    onboarded(store, tmp_path)
    first_runner = FakeRunner(tmp_path, threading.Event())
    first = ErasureCoordinator("acme", store, first_runner, OPTIONS)
    second_runner = FakeRunner(tmp_path)
    second = ErasureCoordinator("acme", TenantStore(store.settings), second_runner, OPTIONS)
    with held_in_background(first, first_runner) as outcome:
        with pytest.raises(LeaseHeldError, match="acme"):
            second.run_until_idle()

        assert second_runner.runs == []  # the first's live job was not re-run
        assert store.get_receipt("acme", "req-1").status == ReceiptStatus.running
    assert [r.status for r in outcome["reports"]] == ["published"]
    receipt = store.get_receipt("acme", "req-1")
    head, _ = store.get_head("acme")
    assert receipt.status == ReceiptStatus.published and receipt.new_adapter_version == head.adapter == "v000002"
    assert head.lease_token == receipt.lease_token == 1  # the first holder's token
    assert second.run_until_idle() == []  # released: the second runs now, with nothing left to do


def test_recovery_takes_over_only_once_the_lease_lapsed_and_the_old_holder_is_fenced(store, tmp_path):
    onboarded(store, tmp_path)
    stalled_runner = FakeRunner(tmp_path, threading.Event())
    short = CoordinatorOptions(purge_grace_seconds=0, warm_curvature=False, lease_ttl_s=1.0, lease_wait_s=10.0)
    stalled = ErasureCoordinator("acme", store, stalled_runner, short)
    with held_in_background(stalled, stalled_runner) as outcome:
        stalled.lease.pause_renewals()  # hung or partitioned: its lease lapses one ttl later
        taker_runner = FakeRunner(tmp_path)
        taker = ErasureCoordinator("acme", TenantStore(store.settings), taker_runner, short)

        reports = taker.run_until_idle()  # waits for the lapse, recovers the running request, runs it

        assert [r.status for r in reports] == ["published"] and taker_runner.runs == [["req-1"]]
    assert [r.status for r in outcome["reports"]] == ["fenced"]  # the old holder wrote nothing
    receipt = store.get_receipt("acme", "req-1")
    head, _ = store.get_head("acme")
    assert receipt.status == ReceiptStatus.published and receipt.new_adapter_version == head.adapter == "v000002"
    assert head.lease_token == receipt.lease_token == 2
    assert store.list_adapter_versions("acme") == ["v000002"]  # no version of the fenced run, v1 purged


# ---------------------------------------------------------------- defect 5: waits on Ray without a timeout
def hanging_ray(monkeypatch) -> types.SimpleNamespace:
    """A fake ``ray`` whose jobs never finish: ``ray.get`` without a timeout is an error here (it would
    hang for good), with one it raises GetTimeoutError as Ray does."""

    class GetTimeoutError(Exception):
        pass

    cancelled = []

    def get(ref, timeout=None):
        if timeout is None:
            raise AssertionError("waited on Ray without a timeout: this would hang forever")
        raise GetTimeoutError(f"Get timed out: some object(s) not ready after {timeout}")

    task = types.SimpleNamespace(remote=lambda *a, **k: "ref")
    fake = types.ModuleType("ray")
    fake.remote = lambda fn: types.SimpleNamespace(options=lambda **kw: task)
    fake.get = get
    fake.cancel = lambda ref, force=False: cancelled.append(ref)
    fake.exceptions = types.SimpleNamespace(GetTimeoutError=GetTimeoutError)
    fake.ObjectRef = type("ObjectRef", (), {})
    monkeypatch.setitem(sys.modules, "ray", fake)
    return types.SimpleNamespace(cancelled=cancelled)


def test_a_hung_ray_task_times_out_and_the_receipt_says_so(store, tmp_path, monkeypatch):
    from cluster.runners import RayTaskJobRunner

    onboarded(store, tmp_path)
    ray = hanging_ray(monkeypatch)
    core = ErasureCoordinator("acme", store, RayTaskJobRunner(RunnerSpec(kind="ray", job_timeout_s=0.2)), OPTIONS)
    core.submit(REQUEST)

    assert [r.status for r in core.run_until_idle()] == ["failed"]

    receipt = store.get_receipt("acme", "req-1")
    assert receipt.status == ReceiptStatus.failed and "timed out after 0.2 s" in receipt.error
    assert ray.cancelled == ["ref"]
    assert store.get_head("acme")[0].adapter == "v000001"


def test_a_hung_train_run_times_out(monkeypatch):
    import ray.train.torch

    from cluster.errors import JobFailedError
    from cluster.jobs import ErasureJob
    from cluster.runners import RayTrainJobRunner

    never = threading.Event()

    class HangingTrainer:
        def __init__(self, *args, **kwargs):
            pass

        def fit(self):  # hangs (bounded here, so that code without a timeout fails instead of hanging)
            never.wait(10)
            raise RuntimeError("the hung run ended by itself")

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", HangingTrainer)
    runner = RayTrainJobRunner(RunnerSpec(kind="ray-train", num_workers=2, job_timeout_s=0.3))
    job = ErasureJob(tenant="acme", store_settings=None, adapter_version="v000001", data_version="d000001",
                     requests=(), selections={}, pipeline=None, job_id="hung")
    try:
        with pytest.raises(JobFailedError, match="timed out after 0.3 s"):
            runner.run_erasure_job(job)
    finally:
        never.set()


def test_timeouts_are_validated():
    from cluster.errors import ClusterError

    with pytest.raises(ClusterError, match="job_timeout_s"):
        RunnerSpec(job_timeout_s=0)
    with pytest.raises(ClusterError, match="lease_ttl_s"):
        CoordinatorOptions(lease_ttl_s=0)
