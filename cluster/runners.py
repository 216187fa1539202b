"""The job-runner seam: where an erasure or training job runs.

- :class:`RayTrainJobRunner`: a Ray Train ``TorchTrainer`` (gloo on CPU, NCCL on GPU). Every worker
  takes its shard of the records (``i % world_size == rank``) and the solver's sums are all-reduced,
  so N workers compute what one process would. Rank 0 hands its result files to a sink actor of the
  run (memory only), never to a Train checkpoint, which Train would copy to its storage (S3 on a
  multi-node cluster); the run's own storage directory is deleted after it.
- :class:`RayTaskJobRunner`: a one-worker job as a Ray task on a pooled worker process. A Train run
  costs about 16 s before and after the job on a 2-core machine (controller, worker group, gloo,
  torch/transformers imports in fresh processes: measured with an empty loop); a pooled worker keeps
  its imports, so a one-worker job skips all of it. The default ``ray`` runner uses it whenever a job
  has one worker (``kind="ray-train"`` forces Train).
- :class:`LocalJobRunner`: the same job functions in this process, world size 1 (unit tests,
  ``--local`` runs).

Each returns a :class:`cluster.jobs.JobResult` or raises :class:`JobFailedError`.

One module of about 400 lines because the runners share how a job's files come back (``_collect``,
``_files_of``, ``_unpack``, ``_resolved``, ``_first_line``) and :func:`make_runner` chooses among
them: a Ray Train module of its own would import this one and be imported by it.
"""

from __future__ import annotations

import abc
import logging
import shutil
import tempfile
import threading
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from eraser.influence import Shard

from cluster.config import CALL_TIMEOUT_S, RunnerSpec
from cluster.errors import JobFailedError
from cluster.jobs import (
    CurvatureJob,
    ErasureJob,
    Heartbeat,
    JobResult,
    TrainingJob,
    execute_job,
    execute_training,
    read_result,
)

logger = logging.getLogger(__name__)


class JobRunner(abc.ABC):
    """Runs jobs to completion (blocking). A failed job raises JobFailedError; a job whose work was
    refused deterministically (solver, guard) returns a JobResult with ``ok == False``."""

    @abc.abstractmethod
    def run_erasure_job(self, job: ErasureJob) -> JobResult:
        """Solve for ``job``'s requests; the result holds the candidate adapter when ``ok``."""

    @abc.abstractmethod
    def run_training_job(self, job: TrainingJob) -> JobResult:
        """Train the tenant's first adapter; the result holds it when ``ok``."""

    @abc.abstractmethod
    def run_curvature_job(self, job: CurvatureJob) -> JobResult:
        """Build an adapter version's low-rank curvature; ``result.load_curvature()`` when ``ok``."""

    def share(self, value: Any) -> Any:
        """How a job of this runner receives a large object the caller keeps (here: the object itself)."""
        return value

    def describe(self) -> dict[str, Any]:
        """What ran the job, for manifests and receipts."""
        return {"runner": type(self).__name__}


class LocalJobRunner(JobRunner):
    """The jobs in this process, world size 1: the same functions the Ray workers call."""

    def run_erasure_job(self, job: ErasureJob) -> JobResult:
        return self._run(job)

    def run_training_job(self, job: TrainingJob) -> JobResult:
        return self._run(job)

    def run_curvature_job(self, job: CurvatureJob) -> JobResult:
        return self._run(job)

    def describe(self) -> dict[str, Any]:
        return {"runner": "local", "world_size": 1}

    @staticmethod
    def _run(job: Any) -> JobResult:
        return _collect(lambda out: execute_job(job, Shard(), out, Heartbeat(job.heartbeat_dir, 0)))


def _collect(fill: Callable[[Path], Any]) -> JobResult:
    """A JobResult over a fresh local directory that ``fill`` writes (deleted again if that fails)."""
    workdir = Path(tempfile.mkdtemp(prefix="eraser-job-"))
    try:
        fill(workdir)
        return JobResult(body=read_result(workdir), workdir=workdir)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


# ---------------------------------------------------------------- Ray Train


def worker_device(use_gpu: bool, local_rank: int) -> str | None:
    """The GPU of a Ray Train worker with ``use_gpu``: ``cuda:<local rank>`` (Train shares the node's GPUs
    among its workers, one per local rank); None for a CPU worker. Made the current CUDA device, which
    NCCL's communicator uses."""
    if not use_gpu:
        return None
    device = f"cuda:{local_rank}"
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(device)
    return device


def _all_reduce_sum(device: Any) -> Callable:
    """``Shard.reduce`` for torch.distributed: sum a tensor over all workers (NCCL needs it on the GPU;
    the method's tensors are there already when the model is)."""
    import torch.distributed as dist

    def reduce(tensor):
        if device is not None and tensor.device != device:
            moved = tensor.to(device)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            return moved.to(tensor.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    return reduce


class _ResultSink:
    """Holds rank 0's result files (path -> bytes) for the driver: a Ray actor of the run's, killed after it.

    Why not a Train checkpoint: Train copies checkpoints to its storage (``ERASER_CLUSTER_STORAGE``, S3 on
    a multi-node cluster), and a candidate adapter or a curvature is tenant data that must live nowhere
    but the job's memory and the store's versions (issue 16); deleting the run afterwards was best effort."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] | None = None

    def put(self, files: dict[str, bytes]) -> None:
        self.files = files  # a restarted worker group (max_failures) overwrites a lost attempt's

    def take(self) -> dict[str, bytes] | None:
        return self.files


def _files_of(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() for path in directory.rglob("*") if path.is_file()}


def _report(rank: int, status: str, out_dir: Path | None, sink: Any) -> None:
    import ray
    import ray.train

    if rank == 0 and out_dir is not None:
        ray.get(sink.put.remote(_files_of(out_dir)), timeout=CALL_TIMEOUT_S)
    ray.train.report({"status": status})


def _resolved(job: Any) -> Any:
    """``job`` with the coordinator's warmed curvature fetched from the object store, if it holds a ref."""
    import ray

    if isinstance(job, ErasureJob) and isinstance(job.curvature, ray.ObjectRef):
        return replace(job, curvature=ray.get(job.curvature, timeout=CALL_TIMEOUT_S))
    return job


def _sharded_worker(config: dict) -> None:
    """The per-worker loop of an erasure or curvature job (module level: Ray pickles it by reference).

    Every worker takes its shard of the records; sums are all-reduced; rank 0 writes the result.
    """
    import ray.train

    job = _resolved(config["job"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = worker_device(bool(config.get("use_gpu")), context.get_local_rank())
    shard = Shard(rank=rank, world_size=world_size, reduce=_all_reduce_sum(device))
    out_dir = Path(tempfile.mkdtemp(prefix="eraser-result-")) if rank == 0 else None
    try:
        body = execute_job(job, shard, out_dir, Heartbeat(job.heartbeat_dir, rank), device=device)
        _report(rank, body["status"], out_dir, config["sink"])
    finally:
        if out_dir is not None:
            shutil.rmtree(out_dir, ignore_errors=True)


def _training_worker(config: dict) -> None:
    import ray.train

    job: TrainingJob = config["job"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = worker_device(bool(config.get("use_gpu")), context.get_local_rank())
    out_dir = Path(tempfile.mkdtemp(prefix="eraser-result-")) if rank == 0 else None
    try:
        body = (execute_training(job, out_dir, Heartbeat(job.heartbeat_dir, rank), device=device) if rank == 0
                else {"status": "ok"})
        _report(rank, body["status"], out_dir, config["sink"])
    finally:
        if out_dir is not None:
            shutil.rmtree(out_dir, ignore_errors=True)


class RayTrainJobRunner(JobRunner):
    """Jobs as Ray Train ``TorchTrainer`` runs on the connected Ray cluster.

    ``max_failures``: how often Train restarts the worker group after a worker dies (FailureConfig);
    the job is idempotent (it only reads the store), so a retry is safe. Onboarding trains on one
    worker (``train_lora`` is not data-parallel); erasures use ``num_workers``.
    """

    def __init__(self, spec: RunnerSpec | None = None) -> None:
        self.spec = spec or RunnerSpec()

    def describe(self) -> dict[str, Any]:
        return {"runner": "ray-train", "num_workers": self.spec.num_workers, "use_gpu": self.spec.use_gpu,
                "max_failures": self.spec.max_failures}

    def run_erasure_job(self, job: ErasureJob) -> JobResult:
        return self._fit(_sharded_worker, job, f"erase-{job.tenant}-{job.job_id or uuid.uuid4().hex[:8]}",
                         self.spec.num_workers)

    def run_curvature_job(self, job: CurvatureJob) -> JobResult:
        return self._fit(_sharded_worker, job, f"curvature-{job.tenant}-{job.job_id or uuid.uuid4().hex[:8]}",
                         self.spec.num_workers)

    def share(self, value: Any) -> Any:
        """A Ray ObjectRef: the workers fetch it from the object store; freed when the caller drops it."""
        import ray

        return ray.put(value)

    def run_training_job(self, job: TrainingJob) -> JobResult:
        return self._fit(_training_worker, job, f"train-{job.tenant}-{job.job_id or uuid.uuid4().hex[:8]}", 1)

    def _fit(self, loop: Callable, job: Any, name: str, num_workers: int) -> JobResult:
        import ray
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        spec = self.spec
        own_storage = spec.storage_path is None
        storage = tempfile.mkdtemp(prefix="eraser-train-") if own_storage else spec.storage_path
        resources = {"CPU": spec.cpus_per_worker} | ({"GPU": 1} if spec.use_gpu else {})
        sink = ray.remote(num_cpus=0)(_ResultSink).options(name=f"result-{name}").remote()
        trainer = TorchTrainer(
            loop,
            train_loop_config={"job": job, "use_gpu": spec.use_gpu, "sink": sink},
            torch_config=TorchConfig(backend="nccl" if spec.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=spec.use_gpu, resources_per_worker=resources),
            run_config=RunConfig(name=name, storage_path=storage,
                                 failure_config=FailureConfig(max_failures=spec.max_failures)),
        )
        logger.info("tenant %s: Ray Train run %s on %d worker(s) (%s), max_failures %d", job.tenant, name,
                    num_workers, "GPU/NCCL" if spec.use_gpu else "CPU/gloo", spec.max_failures)
        try:
            try:
                result = _fit_within(trainer, spec.job_timeout_s, name, job.tenant)
            except JobFailedError:
                raise
            except Exception as error:  # TrainingFailedError and friends: workers lost, retries spent
                raise JobFailedError(f"Ray Train run {name} of tenant {job.tenant!r} failed "
                                     f"(max_failures={spec.max_failures}): {_first_line(error)}") from error
            if getattr(result, "error", None) is not None:
                raise JobFailedError(f"Ray Train run {name} of tenant {job.tenant!r} failed: {_first_line(result.error)}")
            files = ray.get(sink.take.remote(), timeout=CALL_TIMEOUT_S)
            if not files:
                raise JobFailedError(f"Ray Train run {name} of tenant {job.tenant!r} finished without a result")
            return _collect(lambda workdir: _unpack(files, workdir))
        finally:
            ray.kill(sink)
            _delete_run(storage, name, own_storage)


# ---------------------------------------------------------------- one pooled Ray worker


def _job_in_task(job: Any) -> dict[str, bytes]:
    """Run a job, world size 1, in this (pooled) Ray worker; returns its output files (path -> bytes).
    A task Ray gave a GPU (``use_gpu``) sees it alone, as ``cuda:0``."""
    import ray

    job = _resolved(job)
    out_dir = Path(tempfile.mkdtemp(prefix="eraser-result-"))
    try:
        execute_job(job, Shard(), out_dir, Heartbeat(job.heartbeat_dir, 0),
                    device=worker_device(bool(ray.get_gpu_ids()), 0))
        return _files_of(out_dir)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


class RayTaskJobRunner(JobRunner):
    """Jobs as Ray tasks on pooled worker processes, world size 1 (no Train launch; see the module doc).

    ``max_failures``: how often Ray re-runs the task after its worker process dies (jobs only read
    the store, so a retry is safe); an exception in the job is not retried.
    """

    def __init__(self, spec: RunnerSpec | None = None) -> None:
        self.spec = spec or RunnerSpec()

    def describe(self) -> dict[str, Any]:
        return {"runner": "ray-task", "num_workers": 1, "use_gpu": self.spec.use_gpu,
                "max_failures": self.spec.max_failures}

    def run_erasure_job(self, job: ErasureJob) -> JobResult:
        return self._run(job, "erasure")

    def run_training_job(self, job: TrainingJob) -> JobResult:
        return self._run(job, "training")

    def run_curvature_job(self, job: CurvatureJob) -> JobResult:
        return self._run(job, "curvature")

    share = RayTrainJobRunner.share

    def _run(self, job: Any, what: str) -> JobResult:
        import ray

        spec = self.spec
        task = ray.remote(_job_in_task).options(
            num_cpus=spec.cpus_per_worker, num_gpus=1 if spec.use_gpu else 0, max_retries=spec.max_failures,
            name=f"{what}-{job.tenant}-{job.job_id or uuid.uuid4().hex[:8]}")
        logger.info("tenant %s: %s job %s as a Ray task (1 worker, max_failures %d)", job.tenant, what, job.job_id,
                    spec.max_failures)
        ref = task.remote(job)
        try:
            files = ray.get(ref, timeout=spec.job_timeout_s)
        except ray.exceptions.GetTimeoutError as error:
            ray.cancel(ref, force=True)  # frees the worker; a retry of the job starts afresh
            raise JobFailedError(f"the {what} job of tenant {job.tenant!r} timed out after {spec.job_timeout_s:g} s "
                                 "(RunnerSpec.job_timeout_s, ERASER_CLUSTER_JOB_TIMEOUT); its Ray task was cancelled"
                                 ) from error
        except Exception as error:  # the worker died (retries spent) or the job raised
            raise JobFailedError(f"Ray task for the {what} job of tenant {job.tenant!r} failed "
                                 f"(max_failures={spec.max_failures}): {_first_line(error)}") from error
        return _collect(lambda workdir: _unpack(files, workdir))


def _fit_within(trainer: Any, timeout_s: float, name: str, tenant: str) -> Any:
    """``trainer.fit()``, waited on for at most ``timeout_s`` (fit has no timeout of its own). On a timeout
    the run is abandoned (JobFailedError); Train tears its workers down when the driver's run ends."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # noqa: BLE001 (handed to the waiting thread)
            outcome["error"] = error

    thread = threading.Thread(target=fit, daemon=True, name=f"fit-{name}")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise JobFailedError(f"Ray Train run {name} of tenant {tenant!r} timed out after {timeout_s:g} s "
                             "(RunnerSpec.job_timeout_s, ERASER_CLUSTER_JOB_TIMEOUT); the run was abandoned")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _unpack(files: dict[str, bytes], directory: Path) -> None:
    for name, data in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    # Ray's errors put the cause last; keep the head and the cause, not the whole traceback.
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def _delete_run(storage: str, name: str, own_storage: bool) -> None:
    """Delete the run's directory (Train's own state: no checkpoints, results go through the sink)."""
    try:
        if own_storage:
            shutil.rmtree(storage, ignore_errors=True)
            return
        import pyarrow.fs

        filesystem, root = pyarrow.fs.FileSystem.from_uri(storage)
        filesystem.delete_dir(f"{root.rstrip('/')}/{name}")
    except Exception as error:  # best effort: the run directory is not part of the store
        logger.warning("could not delete Ray Train run %s under %s: %s", name, storage, error)


def make_runner(spec: RunnerSpec | None) -> JobRunner:
    """The runner a spec names: ``ray`` is Ray Train for more than one worker, a pooled Ray task for one."""
    spec = spec or RunnerSpec()
    if spec.kind == "local":
        return LocalJobRunner()
    if spec.kind == "ray" and spec.num_workers == 1:
        return RayTaskJobRunner(spec)
    return RayTrainJobRunner(spec)
