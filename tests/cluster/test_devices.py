"""Where a job's model computes: a Ray Train worker with ``use_gpu`` loads it on ``cuda:<local rank>`` in
the tenant recipe's dtype, a CPU worker on the CPU, and the coordinator maps what it loads to the CPU.

Checked by code path (no GPU here, no Ray cluster): the worker loop runs with Ray Train's context
replaced by a fake, down to the ``load_base`` call that would put the model on the device.
"""

from __future__ import annotations

from types import SimpleNamespace

import pydantic
import pytest
import torch

from cluster import jobs, runners
from cluster.jobs import CurvatureJob, JobResult
from cluster.tenant_inputs import job_device, job_dtype, tenant_solve
from eraser.influence import SolveConfig, Shard
from tenants.models import TenantConfig, TrainingRecipe


class _Loaded(Exception):
    """Raised by the fake load_base: the job got as far as loading the model, with these arguments."""


class _FakeContext:
    def __init__(self, world_rank: int, world_size: int, local_rank: int):
        self.world_rank, self.world_size, self.local_rank = world_rank, world_size, local_rank

    def get_world_rank(self):
        return self.world_rank

    def get_world_size(self):
        return self.world_size

    def get_local_rank(self):
        return self.local_rank


def _tenant(**training) -> TenantConfig:
    return TenantConfig(name="acme", base_model="tiny", training=TrainingRecipe(**training))


@pytest.fixture
def fake_store(monkeypatch):
    """The job's stores and model loading replaced: ``loads`` gets each load_base call's arguments."""
    import eraser.model

    config = {"value": _tenant()}
    loads: list[dict] = []

    class Stores:
        def __init__(self, settings):
            store = SimpleNamespace(get_tenant=lambda tenant: config["value"], resolve_base_model=lambda name: "/base",
                                    download_adapter=lambda tenant, version: "/adapter",
                                    read_dataset=lambda tenant, version: [])
            self.shared = self.private = store

        def close(self):
            pass

    def load_base(base_dir, dtype=torch.float32, device=None):
        loads.append({"base_dir": base_dir, "dtype": dtype, "device": device})
        raise _Loaded()

    monkeypatch.setattr(jobs, "_Stores", Stores)
    monkeypatch.setattr(eraser.model, "load_base", load_base)
    monkeypatch.setattr(eraser.model, "load_tokenizer", lambda base_dir, fmt=None: None)
    return SimpleNamespace(config=config, loads=loads)


def _curvature_job() -> CurvatureJob:
    return CurvatureJob(tenant="acme", store_settings=None, adapter_version="v000001", data_version="d000001",
                        solve=SolveConfig(solver="eigen"))


@pytest.mark.parametrize("use_gpu, local_rank, expected", [(True, 1, "cuda:1"), (True, 0, "cuda:0"), (False, 1, "cpu")])
def test_a_ray_train_worker_loads_the_model_on_its_gpu(monkeypatch, fake_store, use_gpu, local_rank, expected):
    import ray.train

    monkeypatch.setattr(ray.train, "get_context", lambda: _FakeContext(local_rank, 2, local_rank))
    reduces = []
    real_reduce = runners._all_reduce_sum
    monkeypatch.setattr(runners, "_all_reduce_sum", lambda device: reduces.append(device) or real_reduce(device))
    monkeypatch.setattr(runners, "_report", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)  # a GPU worker makes its GPU current
    fake_store.config["value"] = _tenant(device="auto", dtype="bfloat16")
    with pytest.raises(_Loaded):
        runners._sharded_worker({"job": _curvature_job(), "use_gpu": use_gpu})
    assert [load["device"] for load in fake_store.loads] == [expected]
    assert fake_store.loads[0]["dtype"] is torch.bfloat16  # the tenant recipe's dtype
    assert reduces == [expected if use_gpu else None]  # NCCL's all-reduce on that GPU


def test_a_training_worker_and_a_ray_task_load_on_their_gpu(monkeypatch, fake_store):
    import ray
    import ray.train

    from cluster.jobs import TrainingJob

    monkeypatch.setattr(ray.train, "get_context", lambda: _FakeContext(0, 1, 3))
    monkeypatch.setattr(runners, "_report", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    with pytest.raises(_Loaded):
        runners._training_worker({"job": TrainingJob(tenant="acme", store_settings=None, data_version="d000001"),
                                  "use_gpu": True})
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [5])  # the one GPU Ray gave the task: its cuda:0
    with pytest.raises(_Loaded):
        runners._job_in_task(_curvature_job())
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    with pytest.raises(_Loaded):
        runners._job_in_task(_curvature_job())
    assert [load["device"] for load in fake_store.loads] == ["cuda:3", "cuda:0", "cpu"]


def test_the_recipe_decides_where_a_job_computes():
    gpu = "cuda:2"
    assert job_device(_tenant(device="cpu"), gpu) == "cpu"  # the tenant asked for the CPU
    assert job_device(_tenant(device="auto"), gpu) == gpu == job_device(_tenant(device="cuda"), gpu)
    assert job_device(_tenant(device="cuda"), None) == "cuda"  # refused by load_base where there is none
    assert job_device(_tenant(device="auto"), None) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert job_dtype(_tenant()) is torch.float32 and job_dtype(_tenant(dtype="bfloat16")) is torch.bfloat16
    assert TrainingRecipe().device == "auto" and TrainingRecipe().dtype == "float32"
    for bad in ({"device": "gpu"}, {"device": "cuda:0"}, {"dtype": "float16"}, {"dtype": "bf16"}):
        with pytest.raises(pydantic.ValidationError):
            TrainingRecipe(**bad)


def test_the_coordinator_maps_a_workers_curvature_to_the_cpu(monkeypatch, tmp_path):
    seen = {}
    real_load = torch.load

    def load(path, **kwargs):
        seen.update(kwargs)
        return real_load(path, **kwargs)

    torch.save({"vectors": torch.zeros(4, 2), "values": torch.ones(2), "info": {"method": "sampled"}},
               tmp_path / jobs.CURVATURE_FILE)
    monkeypatch.setattr(torch, "load", load)
    curvature = JobResult(body={"status": "ok"}, workdir=tmp_path).load_curvature()
    assert seen.get("map_location") == "cpu" and seen.get("weights_only") is True
    assert curvature.vectors.device == torch.device("cpu") and curvature.rank == 2


def test_a_cpu_worker_reduces_in_place(monkeypatch):
    reduce = runners._all_reduce_sum(None)
    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None: calls.append(tensor.device))
    tensor = torch.ones(3)
    assert reduce(tensor) is tensor and calls == [torch.device("cpu")]
    assert Shard().reduce(tensor) is tensor


def test_a_tenants_curvature_budget_reaches_its_jobs():
    solve = SolveConfig(solver="eigen")
    assert tenant_solve(solve, _tenant()) is solve  # None: the service's budget
    assert tenant_solve(solve, _tenant(curvature_budget_mib=512)).cache_budget_mib == 512
    with pytest.raises(pydantic.ValidationError):
        TrainingRecipe(curvature_budget_mib=0)
