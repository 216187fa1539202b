"""Integration on the session's real Ray head (``ray start --head``) and SeaweedFS: Ray Train jobs,
coordinator actors, a worker killed mid-solve, and ``ray job submit`` of the batch entry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cluster import (CoordinatorOptions, LocalJobRunner, RayErasureService, RayTaskJobRunner, RayTrainJobRunner,
                     RunnerSpec, make_runner)
from cluster.actors import stop_coordinator
from cluster.jobs import ErasureJob
from tenants.models import ReceiptStatus
from tests.cluster.conftest import onboard_local
from tests.cluster.helpers import EIGEN, PIPELINE, SOLVE, create_tenant, remove_subject, tenant_records
from tests.cluster.ray_head import RAY
from tests.tolerances import DISTRIBUTED, assert_close

pytestmark = pytest.mark.slow
OPTIONS = CoordinatorOptions(pipeline=PIPELINE, purge_grace_seconds=0)


def lora_vector(adapter_dir: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return torch.cat([weights[name].reshape(-1).double() for name in sorted(weights)])


def erasure_job(store, records, request_id="req-1", pipeline=PIPELINE, heartbeat_dir=None) -> ErasureJob:
    head, _ = store.get_head("acme")
    request = remove_subject("acme", request_id, records, 1)
    selected = tuple(r.id for r in records if r.subject == request["subjects"][0])
    return ErasureJob(tenant="acme", store_settings=store.settings, adapter_version=head.adapter,
                      data_version=head.data, requests=(request,), selections={request_id: selected}, pipeline=pipeline,
                      job_id=uuid.uuid4().hex[:6], heartbeat_dir=heartbeat_dir)


def test_ray_train_with_one_and_two_workers_and_a_ray_task_give_the_same_update(ray_cluster, grace0_settings,
                                                                               tiny_base, capsys):
    store, records = onboard_local(grace0_settings, tiny_base)
    job = erasure_job(store, records["acme"])
    parent = lora_vector(store.download_adapter("acme", job.adapter_version))
    steps, seconds = {}, {}
    for workers in (1, 2):
        started = time.perf_counter()
        with RayTrainJobRunner(RunnerSpec(num_workers=workers, max_failures=0)).run_erasure_job(job) as result:
            assert result.ok, result.error
            assert result.body["world_size"] == workers
            steps[workers] = lora_vector(result.adapter_dir) - parent
            seconds[workers] = (time.perf_counter() - started, result.body["stages"])
    with LocalJobRunner().run_erasure_job(job) as result:
        steps["local"] = lora_vector(result.adapter_dir) - parent
    runner = make_runner(RunnerSpec(num_workers=1, max_failures=0))
    assert isinstance(runner, RayTaskJobRunner)  # one worker: a pooled Ray task, no Train launch
    for _ in range(2):  # the second run reuses the worker process
        with runner.run_erasure_job(job) as result:
            assert result.ok, result.error
            assert result.body["world_size"] == 1
            steps["task"] = lora_vector(result.adapter_dir) - parent

    assert float(steps[1].norm()) > 0
    assert_close(steps[2], steps[1], DISTRIBUTED)
    assert_close(steps["local"], steps[1], DISTRIBUTED)
    assert_close(steps["task"], steps["local"], DISTRIBUTED)
    with capsys.disabled():
        for workers, (wall, stages) in seconds.items():
            print(f"\n[measure] erasure with {workers} Ray Train worker(s): {wall:.1f}s end to end, "
                  f"job {stages['job_s']:.2f}s, influence {stages['influence_s']:.2f}s, load {stages['load_s']:.2f}s")


def test_a_ray_train_result_never_lands_in_train_storage(ray_cluster, grace0_settings, tiny_base, tmp_path,
                                                        monkeypatch):
    """A curvature job through Ray Train with storage configured (as ERASER_CLUSTER_STORAGE does): the
    curvature comes back to the driver, and Train's storage never held it, even with the run's deletion
    switched off (it was the only cleanup, best effort, when results travelled as checkpoints)."""
    from cluster import runners
    from cluster.jobs import CurvatureJob

    store, _ = onboard_local(grace0_settings, tiny_base)
    monkeypatch.setattr(runners, "_delete_run", lambda *args: None)
    storage = tmp_path / "train-storage"
    runner = RayTrainJobRunner(RunnerSpec(kind="ray-train", num_workers=1, max_failures=0, storage_path=str(storage)))
    with runner.run_curvature_job(CurvatureJob("acme", grace0_settings, "v000001", "d000001", EIGEN)) as result:
        assert result.ok, result.error
        assert result.load_curvature().rank > 0
    kept = sorted(str(p.relative_to(storage)) for p in storage.rglob("*") if p.is_file())
    assert not [name for name in kept if name.endswith(("curvature.pt", ".safetensors", "result.json"))], kept


class SwitchBoard:
    """Stands in for the serving layer: records HEAD moves, answers when 'every replica' switched."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def on_published(self, tenant: str, head: dict) -> dict:
        self.seen.append((tenant, head["adapter"]))
        return {"switched_at": "2030-01-01T00:00:00+00:00"}

    def calls(self) -> list[tuple[str, str]]:
        return list(self.seen)


def test_onboarding_and_erasure_through_the_coordinator_actor(ray_cluster, grace0_settings, tiny_base, namespace):
    import ray

    from cluster import ActorMethodHook
    from tenants.store import TenantStore

    store = TenantStore(grace0_settings)
    records = tenant_records("acme")
    create_tenant(store, "acme", tiny_base, records)
    board = ray.remote(SwitchBoard).options(name="switchboard", namespace=namespace, num_cpus=0).remote()
    options = replace(OPTIONS, pipeline=replace(PIPELINE, solve=EIGEN))
    service = RayErasureService(grace0_settings, RunnerSpec(num_workers=2, max_failures=0), options, namespace=namespace)
    service.register_publish_hook("serve", ActorMethodHook("switchboard", namespace=namespace))
    try:
        assert service.onboard("acme") == "v000001"  # a Ray Train training job
        # then, in the background, a curvature job on 2 workers; the actor keeps it in the object store
        coordinator = service.coordinator("acme")
        deadline = time.monotonic() + 240
        while ray.get(coordinator.describe.remote())["curvature_warmed_for"] != "v000001":
            assert time.monotonic() < deadline, ray.get(coordinator.describe.remote())
            time.sleep(0.5)
        request = remove_subject("acme", "req-1", records, 2)
        erased = {r.id for r in records if r.subject == request["subjects"][0]}
        assert service.submit(request).status == ReceiptStatus.pending

        (receipt,) = service.wait("acme", ["req-1"], timeout_s=300)
        assert receipt.status == ReceiptStatus.published, receipt.error
        # A receipt turns 'published' at the HEAD move; the purge that follows is logged in it
        # afterwards. purge_due queues behind the coordinator's round, so the log is complete after it.
        service.purge_due(["acme"])
        receipt = store.get_receipt("acme", "req-1")
        head, _ = store.get_head("acme")
        assert (head.adapter, head.data) == ("v000002", "d000002") == (receipt.new_adapter_version, receipt.new_data_version)
        assert erased.isdisjoint(r.id for r in store.read_dataset("acme", head.data))
        assert store.list_adapter_versions("acme") == ["v000002"] and store.list_data_versions("acme") == ["d000002"]
        assert receipt.solver["extra"]["world_size"] == 2 and receipt.solver["converged"]
        assert receipt.solver["curvature_cache"] == "warmed after the adapter version was published"
        assert receipt.path == "influence" and receipt.checks["guard"]["passed"] and receipt.purged
        assert sorted(receipt.records_affected) == sorted(erased)
        assert store.get_adapter_manifest("acme", "v000002").arguments["runner"]["runner"] == "ray-train"
        assert receipt.replicas_switched_at is not None
        assert ray.get(board.calls.remote()) == [("acme", "v000001"), ("acme", "v000002")]
        assert service.submit(request).status == ReceiptStatus.published  # idempotent: the same erasure
    finally:
        stop_coordinator("acme", namespace)


@pytest.mark.parametrize("workers, victim, runner_error", [(2, 1, "Ray Train run"), (1, 0, "Ray task")],
                         ids=["ray-train-rank-1", "ray-task"])
def test_a_worker_killed_mid_solve_fails_the_job_cleanly_and_publishes_nothing(ray_cluster, grace0_settings, tiny_base,
                                                                             namespace, tmp_path, workers, victim,
                                                                             runner_error):
    store, records = onboard_local(grace0_settings, tiny_base)
    beats = tmp_path / "heartbeats"
    endless = replace(SOLVE, tol=1e-9, max_iters=2000)  # long enough to be caught in the middle
    service = RayErasureService(grace0_settings, RunnerSpec(num_workers=workers, max_failures=0),
                                replace(OPTIONS, pipeline=replace(PIPELINE, solve=endless)), namespace=namespace,
                                heartbeat_dir=str(beats))
    killed: dict = {}

    def kill_mid_solve() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                beat = json.loads((beats / f"rank-{victim}.json").read_text())
            except (OSError, ValueError):
                beat = {}
            if beat.get("stage") == "solve" and beat.get("iteration", 0) >= 3:
                os.kill(beat["pid"], signal.SIGKILL)
                killed.update(beat)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_mid_solve, daemon=True)
    killer.start()
    try:
        service.submit(remove_subject("acme", "req-1", records["acme"], 1))
        killer.join(timeout=250)
        assert killed, f"the solve never reached iteration 3 on rank {victim}"
        (receipt,) = service.wait("acme", ["req-1"], timeout_s=300)
    finally:
        stop_coordinator("acme", namespace)

    assert receipt.status == ReceiptStatus.failed
    assert runner_error in receipt.error and "failed" in receipt.error
    assert receipt.new_adapter_version is None and receipt.new_data_version is None
    head, _ = store.get_head("acme")
    assert (head.adapter, head.data) == ("v000001", "d000001")
    assert store.list_adapter_versions("acme") == ["v000001"] and store.list_data_versions("acme") == ["d000001"]
    rank0 = json.loads((beats / "rank-0.json").read_text())
    assert rank0["stage"] != "done"  # rank 0 never finished: killed, or its group torn down


def test_ray_job_submit_runs_the_batch_entry_for_two_tenants(ray_cluster, grace0_settings, tiny_base, namespace, tmp_path):
    store, records = onboard_local(grace0_settings, tiny_base, tenants=("acme", "globex"))
    lines = [remove_subject("acme", "a-1", records["acme"], 0), remove_subject("acme", "a-2", records["acme"], 1),
             remove_subject("globex", "g-1", records["globex"], 0),
             {"request_id": "g-bad", "tenant": "globex", "kind": "remove", "records": ["no-such-record"]}]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    settings = grace0_settings
    env_vars = {"ERASER_S3_ENDPOINT": settings.endpoint, "ERASER_S3_BUCKET": settings.bucket,
                "ERASER_S3_PREFIX": settings.prefix, "ERASER_S3_ACCESS_KEY": settings.access_key,
                "ERASER_S3_SECRET_KEY": settings.secret_key.get_secret_value(), "ERASER_S3_REGION": "us-east-1",
                "ERASER_S3_CACHE_DIR": str(tmp_path / "job-cache"), "ERASER_S3_PURGE_GRACE_SECONDS": "0"}
    command = [RAY, "job", "submit", "--address", ray_cluster.dashboard_url,
               "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--",
               sys.executable, "-m", "cluster.batch", "--requests", str(requests), "--workers", "1",
               "--max-failures", "0", "--namespace", namespace, "--damping", str(SOLVE.damping),
               "--max-iters", str(SOLVE.max_iters), "--tol", str(SOLVE.tol)]
    try:
        done = subprocess.run(command, env=ray_cluster.env, capture_output=True, text=True, timeout=420)
    finally:
        for tenant in ("acme", "globex"):
            stop_coordinator(tenant, namespace)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "succeeded" in output, output[-4000:]
    assert "TENANT" in output and "STATUS" in output  # the summary table
    for tenant, request_id in (("acme", "a-1"), ("acme", "a-2"), ("globex", "g-1")):
        receipt = store.get_receipt(tenant, request_id)
        assert receipt.status == ReceiptStatus.published, receipt.error
        assert receipt.purged
    assert store.get_receipt("acme", "a-1").new_adapter_version == store.get_receipt("acme", "a-2").new_adapter_version
    assert store.get_receipt("globex", "g-bad").status == ReceiptStatus.rejected
    assert store.get_head("acme")[0].adapter == "v000002" and store.get_head("globex")[0].adapter == "v000002"


def test_a_job_worker_stays_warm_while_replicas_hold_the_cpus(ray_cluster):
    """Ray ends idle workers beyond the node's available CPUs unless ``RAY_num_workers_soft_limit`` says more
    (cluster.config.keep_job_workers_warm; the session's head sets it as the product's nodes do). Here an
    actor holds all but a sliver of the CPUs, as Serve's replicas do, and the next job must still find the
    process the last one warmed. Without the setting Ray ends it within a second and the pids differ."""
    import ray

    @ray.remote(num_cpus=0.25)
    def job_process() -> int:
        return os.getpid()

    @ray.remote
    class Replica:
        def ready(self) -> bool:
            return True

    first = ray.get(job_process.remote(), timeout=120)
    spare = ray.available_resources().get("CPU", 0.0)
    replica = Replica.options(num_cpus=max(spare - 0.25, 0.0)).remote() if spare > 0.5 else None
    try:
        if replica is not None:
            ray.get(replica.ready.remote(), timeout=120)
        time.sleep(3)  # Ray looks for idle workers to end every 200 ms and ends them after 1 s idle
        assert ray.get(job_process.remote(), timeout=120) == first
    finally:
        if replica is not None:
            ray.kill(replica)
