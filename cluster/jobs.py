"""The work of one job, the same in a Ray Train worker and in-process: load, solve (or train), save.

A job reads the tenant's state from the store (base model from the shared cache, the adapter into a
job-private cache that is deleted afterwards, so superseded weights do not linger on workers) and
writes its result into ``out_dir``: the candidate adapter (``adapter/``) and ``result.json``. It never
writes to the store: publishing is the coordinator's, after the job, so a job that dies leaves
nothing behind. Only rank 0 writes ``out_dir``; every rank computes (all-reduced sums).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from eraser.errors import EraserError
from eraser.curvature import lora_parameters
from eraser.influence import InfluenceSystem, Shard, SolveConfig, curvature_mismatch
from eraser.pipeline import PipelineConfig
from tenants.errors import TenantError
from tenants.settings import StoreSettings
from tenants.store import TenantStore

from cluster.errors import ClusterError, GuardRejectedError
from cluster.tenant_inputs import (  # noqa: F401  (record_format, train_config: also used through this module)
    edit_requests,
    job_device,
    job_dtype,
    record_format,
    retrain_recipe,
    split_records,
    tenant_solve,
    train_config,
    with_retrain_note,
)

logger = logging.getLogger(__name__)

# Jobs this process ran before the current one: a pooled Ray worker (RayTaskJobRunner) that ran none
# pays transformers' lazy imports inside the first model load (seconds; see the load_* stages).
_jobs_run = 0

RESULT_FILE = "result.json"
ADAPTER_SUBDIR = "adapter"
CURVATURE_FILE = "curvature.pt"


# ---------------------------------------------------------------- job descriptions


@dataclass(frozen=True)
class ErasureJob:
    """One solve for a batch of a tenant's requests against one (adapter, data) version pair."""

    tenant: str
    store_settings: StoreSettings
    adapter_version: str
    data_version: str
    requests: tuple[dict, ...]  # ErasureRequest JSON, in batch order
    selections: dict[str, tuple[str, ...]]  # request id -> the record ids it edits (resolved, deduplicated)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    job_id: str = ""
    heartbeat_dir: str | None = None  # each worker writes rank-<r>.json here (progress, pid): monitoring, tests
    # The adapter version's low-rank curvature, warmed by a CurvatureJob after it was published (a
    # LowRankCurvature, or a Ray ObjectRef the Ray worker resolves). None: the job builds it.
    curvature: Any = None

    @property
    def request_ids(self) -> list[str]:
        return [r["request_id"] for r in self.requests]


@dataclass(frozen=True)
class CurvatureJob:
    """Build the low-rank curvature of one (adapter, data) version pair for the erasures to come.

    The curvature does not depend on the request, so the coordinator builds it once per version,
    after publishing (off the request's path), and hands it to every erasure job on that version.
    """

    tenant: str
    store_settings: StoreSettings
    adapter_version: str
    data_version: str
    solve: SolveConfig  # solver "eigen" and its cache_* knobs
    job_id: str = ""
    heartbeat_dir: str | None = None


@dataclass(frozen=True)
class TrainingJob:
    """Onboarding: train a tenant's first adapter on the non-held-out split of one data version."""

    tenant: str
    store_settings: StoreSettings
    data_version: str
    job_id: str = ""
    heartbeat_dir: str | None = None


@dataclass
class JobResult:
    """What a job left in its output directory, on the caller's machine. Call :meth:`cleanup` after use."""

    body: dict  # result.json: status, path, solver, checks, stages, ...
    workdir: Path | None = None

    @property
    def ok(self) -> bool:
        return self.body.get("status") == "ok"

    @property
    def error(self) -> str | None:
        return self.body.get("error")

    @property
    def adapter_dir(self) -> Path | None:
        if self.workdir is None:
            return None
        path = self.workdir / ADAPTER_SUBDIR
        return path if path.is_dir() else None

    def load_curvature(self):
        """The LowRankCurvature a CurvatureJob left (None if there is none)."""
        from eraser.solvers import LowRankCurvature

        path = self.workdir / CURVATURE_FILE if self.workdir is not None else None
        if path is None or not path.is_file():
            return None
        import torch

        saved = torch.load(path, weights_only=True, map_location="cpu")  # a GPU worker's, on a CPU coordinator
        return LowRankCurvature(vectors=saved["vectors"], values=saved["values"], info=saved["info"])

    def cleanup(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "JobResult":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


# ---------------------------------------------------------------- helpers


class Heartbeat:
    """Writes ``<dir>/rank-<r>.json`` (stage, iteration, pid) atomically; a no-op without a directory."""

    def __init__(self, directory: str | None, rank: int) -> None:
        self.path = Path(directory) / f"rank-{rank}.json" if directory else None
        self.rank = rank
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, stage: str, **fields: Any) -> None:
        if self.path is None:
            return
        body = {"rank": self.rank, "pid": os.getpid(), "stage": stage, "time": time.time(), **fields}
        staging = self.path.with_suffix(f".tmp{os.getpid()}")
        staging.write_text(json.dumps(body))
        os.replace(staging, self.path)


class _Stores:
    """The shared store (base models: big, not tenant data) and a job-private one (adapters)."""

    def __init__(self, settings: StoreSettings) -> None:
        from tenants.scratch import PrivateDir

        # locked while the job lives; a SIGKILLed job's copy (the parent adapter) is swept by the next job
        self._scratch = PrivateDir("eraser-job-cache-")
        self.private_dir = self._scratch.path
        self.shared = TenantStore(settings)
        self.private = TenantStore(settings.model_copy(update={"cache_dir": self.private_dir}))

    def close(self) -> None:
        self._scratch.close()


def _write_result(out_dir: Path, body: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULT_FILE).write_text(json.dumps(body, indent=2, default=str))


def read_result(out_dir: Path) -> dict:
    path = Path(out_dir) / RESULT_FILE
    if not path.is_file():
        raise ClusterError(f"job output {out_dir} has no {RESULT_FILE}")
    return json.loads(path.read_text())


# ---------------------------------------------------------------- erasure


def execute_erasure(job: ErasureJob, shard: Shard, out_dir: Path | None,
                    beat: Callable[..., None] | None = None, device: str | None = None) -> dict:
    """Run one erasure job on this worker; rank 0 (``out_dir`` given) writes the candidate and result.json.

    Deterministic failures (invalid request, solver diverged or unconverged, guard) come back as
    ``status="failed"`` rather than exceptions, so Ray Train does not retry them; anything else
    (a lost worker, a bug) raises and is the runner's to retry or report.
    """
    from eraser.update import save_adapter

    from cluster.verification import verify_and_guard

    beat = beat or (lambda *a, **k: None)
    started = time.perf_counter()
    stages: dict[str, float] = {}
    body: dict[str, Any] = {"kind": "erasure", "job_id": job.job_id, "tenant": job.tenant,
                            "request_ids": job.request_ids, "world_size": shard.world_size}
    stores = _Stores(job.store_settings)
    try:
        beat("load")
        config, tokenizer, model, train, heldout = _load_version(stores, job.tenant, job.adapter_version,
                                                                 job.data_version, device, stages)
        job = replace(job, pipeline=replace(job.pipeline, solve=tenant_solve(job.pipeline.solve, config)))
        requests, trained = edit_requests(job, {r.id for r in train})
        curvature = _usable_curvature(job, model)
        stages["load_s"] = time.perf_counter() - started
        body.update(train_records=len(train), heldout_records=len(heldout), trained_records_affected=trained)
        logger.info("tenant %s job %s rank %d/%d: %d request(s), %d trained record(s) affected, %d train, %d held out",
                    job.tenant, job.job_id, shard.rank, shard.world_size, len(job.requests),
                    sum(len(v) for v in trained.values()), len(train), len(heldout))

        progress = lambda iteration, residual: beat("solve", iteration=iteration, residual=residual)  # noqa: E731
        beat("solve", iteration=0)
        try:
            outcome = verify_and_guard(model, tokenizer, train, heldout, requests, job.pipeline,
                                       recipe=retrain_recipe(config), shard=shard, progress=progress,
                                       is_root=out_dir is not None, curvature=curvature)
        except GuardRejectedError as error:
            body.update(status="failed", error=str(error), error_type=type(error).__name__,
                        checks=with_retrain_note(error.checks, config))
        except (EraserError, TenantError, ClusterError) as error:
            body.update(status="failed", error=str(error), error_type=type(error).__name__)
        else:
            body.update(status="ok")
            if outcome is not None:  # root rank: the evidence
                body.update(path=outcome.path, solver=outcome.solver, checks=with_retrain_note(outcome.checks, config))
                if job.pipeline.solve.solver == "eigen" and "config" in outcome.solver:
                    body["solver"]["curvature_cache"] = ("warmed after the adapter version was published"
                                                         if curvature is not None else "built in this job")
                stages.update({("erase_s" if k == "total_s" else k): v for k, v in outcome.stages.items()})
        beat("save", status=body["status"])
        stages["job_s"] = time.perf_counter() - started
        body["stages"] = stages
        if out_dir is not None:
            if body["status"] == "ok":
                save_adapter(model, Path(out_dir) / ADAPTER_SUBDIR,
                             {"parent_version": job.adapter_version, "request_ids": job.request_ids,
                              "path": body["path"]})
            _write_result(Path(out_dir), body)
        beat("done", status=body["status"])
        return body
    finally:
        stores.close()


def _load_version(stores: _Stores, tenant: str, adapter_version: str, data_version: str,
                  worker_device: str | None = None, stages: dict[str, float] | None = None):
    """The tenant's config, tokenizer, base model with the adapter version (on :func:`job_device`, in the
    recipe's dtype), and its train / held-out split. ``stages`` gets the seconds of each part: what
    request-to-live spends before the method starts (a fresh worker pays the imports)."""
    stages = {} if stages is None else stages
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        stages[name] = now - mark
        mark = now

    from eraser.model import load_adapter, load_base, load_tokenizer

    lap("load_imports_s")
    config = stores.shared.get_tenant(tenant)
    base_dir = stores.shared.resolve_base_model(config.base_model)
    lap("load_base_files_s")
    adapter_dir = stores.private.download_adapter(tenant, adapter_version)
    train, heldout = split_records(config, stores.private.read_dataset(tenant, data_version))
    lap("load_tenant_files_s")
    tokenizer = load_tokenizer(base_dir, record_format(config))
    base = load_base(base_dir, job_dtype(config), job_device(config, worker_device))
    lap("load_base_model_s")
    model = load_adapter(base, adapter_dir)
    lap("load_adapter_s")
    return config, tokenizer, model, train, heldout


def _usable_curvature(job: ErasureJob, model):
    """``job.curvature`` if it is this adapter's under the job's settings; else None (the job builds it)."""
    if job.curvature is None or job.pipeline.solve.solver != "eigen":
        return None
    why = curvature_mismatch(job.curvature, lora_parameters(model), job.pipeline.solve)
    if why is not None:
        logger.warning("tenant %s job %s: not using the warmed curvature: %s", job.tenant, job.job_id, why)
        return None
    return job.curvature


# ---------------------------------------------------------------- curvature (warming a version)


def execute_curvature(job: CurvatureJob, shard: Shard, out_dir: Path | None,
                      beat: Callable[..., None] | None = None, device: str | None = None) -> dict:
    """Build the version's low-rank curvature on this worker's shard (collective); rank 0 saves it."""
    import torch

    beat = beat or (lambda *a, **k: None)
    started = time.perf_counter()
    body: dict[str, Any] = {"kind": "curvature", "job_id": job.job_id, "tenant": job.tenant,
                            "adapter_version": job.adapter_version, "data_version": job.data_version,
                            "world_size": shard.world_size}
    stores = _Stores(job.store_settings)
    try:
        beat("load")
        config, tokenizer, model, train, _ = _load_version(stores, job.tenant, job.adapter_version,
                                                           job.data_version, device)
        load_s = time.perf_counter() - started
        beat("curvature")
        try:
            cache = InfluenceSystem(model, tokenizer, train, tenant_solve(job.solve, config), shard).curvature_cache()
        except EraserError as error:
            body.update(status="failed", error=str(error), error_type=type(error).__name__)
        else:
            body.update(status="ok", rank=cache.rank, top_eigenvalue=cache.top,
                        info={k: v for k, v in cache.info.items() if k != "adapter"})
            if out_dir is not None:
                Path(out_dir).mkdir(parents=True, exist_ok=True)
                torch.save({"vectors": cache.vectors.cpu(), "values": cache.values.cpu(), "info": cache.info},
                           Path(out_dir) / CURVATURE_FILE)
        body["stages"] = {"load_s": load_s, "job_s": time.perf_counter() - started}
        if out_dir is not None:
            _write_result(Path(out_dir), body)
        beat("done", status=body["status"])
        return body
    finally:
        stores.close()


def execute_job(job: ErasureJob | CurvatureJob | TrainingJob, shard: Shard, out_dir: Path | None,
                beat: Callable[..., None] | None = None, device: str | None = None) -> dict:
    """Run any job on this worker: erasure and curvature jobs on ``shard``, training (one worker) without.
    ``device``: the GPU the runner gave this worker (None: a CPU worker); see :func:`job_device`."""
    global _jobs_run
    logger.info("%s %s of tenant %s in process %d, which ran %d job(s) before", type(job).__name__, job.job_id,
                job.tenant, os.getpid(), _jobs_run)
    _jobs_run += 1
    if isinstance(job, TrainingJob):
        return execute_training(job, out_dir, beat, device)
    if isinstance(job, ErasureJob):
        return execute_erasure(job, shard, out_dir, beat, device)
    return execute_curvature(job, shard, out_dir, beat, device)


# ---------------------------------------------------------------- training (onboarding)


def execute_training(job: TrainingJob, out_dir: Path | None, beat: Callable[..., None] | None = None,
                     device: str | None = None) -> dict:
    """Train the tenant's first adapter on the non-held-out split of ``job.data_version`` (rank 0 only)."""
    from eraser.model import load_base, load_tokenizer
    from eraser.training import add_lora, train_lora
    from eraser.update import save_adapter

    beat = beat or (lambda *a, **k: None)
    started = time.perf_counter()
    body: dict[str, Any] = {"kind": "training", "job_id": job.job_id, "tenant": job.tenant,
                            "data_version": job.data_version}
    stores = _Stores(job.store_settings)
    try:
        beat("load")
        config = stores.shared.get_tenant(job.tenant)
        base_dir = stores.shared.resolve_base_model(config.base_model)
        train, heldout = split_records(config, stores.private.read_dataset(job.tenant, job.data_version))
        recipe = train_config(config)
        tokenizer = load_tokenizer(base_dir, record_format(config))
        model = add_lora(load_base(base_dir, job_dtype(config), job_device(config, device)), recipe)
        load_s = time.perf_counter() - started
        beat("train", step=0)
        try:
            report = train_lora(model, tokenizer, train, recipe,
                                progress=lambda step, total, loss: beat("train", step=step, total=total, loss=loss))
        except EraserError as error:
            body.update(status="failed", error=str(error), error_type=type(error).__name__)
        else:
            body.update(status="ok", path="train", recipe=recipe.to_dict(),
                        training={k: v for k, v in asdict(report).items() if k != "loss_history"},
                        train_records=len(train), heldout_records=len(heldout))
        body["stages"] = {"load_s": load_s, "job_s": time.perf_counter() - started}
        if out_dir is not None:
            if body["status"] == "ok":
                save_adapter(model, Path(out_dir) / ADAPTER_SUBDIR, {"path": "train", "recipe": recipe.to_dict()})
            _write_result(Path(out_dir), body)
        beat("done", status=body["status"])
        return body
    finally:
        stores.close()
