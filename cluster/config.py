"""How jobs run and how a coordinator decides: frozen dataclasses that travel into Ray actors.

Defaults live here, each readable from an ``ERASER_CLUSTER_*`` environment variable (parsed by
pydantic-settings when the object is built, so a Ray job's ``runtime_env`` sets them for every process
it starts; the module-level timeouts and namespace are read at import).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from eraser.influence import SolveConfig
from eraser.pipeline import PipelineConfig

from cluster.errors import ClusterError

class ClusterEnvironment(BaseSettings):
    """The ``ERASER_CLUSTER_*`` environment variables, parsed and checked (an empty value means unset).
    Built afresh wherever a default is needed, so a Ray job's ``runtime_env`` reaches every process."""

    model_config = SettingsConfigDict(env_prefix="ERASER_CLUSTER_", env_ignore_empty=True, extra="ignore")

    namespace: str = "eraser"  # Ray namespace of coordinators and hooks
    runner: Literal["ray", "ray-train", "local"] = "ray"
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 1
    storage: str | None = None
    job_timeout: float = 3600.0
    call_timeout: float = 120.0
    round_timeout: float = 4 * 3600.0
    reconcile_interval: float = 30.0
    lease_ttl: float = 30.0
    lease_wait: float = 60.0
    max_attempts: int = 3
    retry_backoff: float = 10.0
    redrive_after: float = 300.0


def environment() -> ClusterEnvironment:
    """The environment's settings now; a malformed value raises a ClusterError naming the variable."""
    try:
        return ClusterEnvironment()
    except ValidationError as error:
        problems = "; ".join(f"ERASER_CLUSTER_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}"
                             for e in error.errors())
        raise ClusterError(f"invalid cluster environment: {problems}") from None


_AT_IMPORT = environment()
NAMESPACE = _AT_IMPORT.namespace
COORDINATOR_PREFIX = "eraser-coordinator:"  # + tenant: the named actor of that tenant
# How long a caller waits for a quick actor call (submit, describe, purge, hooks) before giving up.
CALL_TIMEOUT_S = _AT_IMPORT.call_timeout
# How long a caller waits for a tenant's coordinator to finish its rounds (process, purge behind a round).
ROUND_TIMEOUT_S = _AT_IMPORT.round_timeout
# How often the reconciler (cluster.reconciler) looks for stalled work, after its first pass at start.
RECONCILE_INTERVAL_S = _AT_IMPORT.reconcile_interval


# Ray keeps idle worker processes only up to the node's *available* CPUs by default and ends the rest about a
# second after they go idle. Serve's replicas hold CPUs while idle, so on a node that also serves models Ray
# ends the job worker that has torch, transformers and the model code imported, and the next erasure job
# pays a cold worker (about 7-13 s of the reduced demo's 24 s request-to-live, against a 6 s method).
# Ray reads this variable when a node starts; set it on every node (the k8s manifests and ray_cluster.yaml
# do), or call keep_job_workers_warm() before a local ``ray.init``.
IDLE_WORKERS_ENV = "RAY_num_workers_soft_limit"
IDLE_JOB_WORKERS = 4  # idle worker processes a node keeps: enough for a few tenants' jobs at once


def keep_job_workers_warm(count: int = IDLE_JOB_WORKERS) -> None:
    """Before a local ``ray.init`` starts its node: keep up to ``count`` idle workers per node (unless
    ``RAY_num_workers_soft_limit`` is already set), so one-worker jobs reuse a process that has its imports."""
    os.environ.setdefault(IDLE_WORKERS_ENV, str(count))


@dataclass(frozen=True)
class RunnerSpec:
    """Which job runner executes erasure and training jobs, and with what resources."""

    # ray: on the Ray cluster, Ray Train (TorchTrainer) for more than one worker and a pooled Ray task for
    # one (a Train launch costs ~16 s on 2 cores); ray-train: always Train; local: this process, world size 1.
    kind: Literal["ray", "ray-train", "local"] = field(default_factory=lambda: environment().runner)
    num_workers: int = field(default_factory=lambda: environment().workers)  # workers per erasure
    use_gpu: bool = field(default_factory=lambda: environment().use_gpu)  # one GPU per worker, NCCL
    # CPUs each job (a Train worker, a pooled task, the import check) reserves.
    cpus_per_worker: float = field(default_factory=lambda: environment().cpus_per_worker)
    max_failures: int = field(default_factory=lambda: environment().max_failures)  # Train retries after a worker dies
    # Where Train keeps its run state (never results: see runners._ResultSink): a local directory (one node) or a URI every node reaches
    # (s3://bucket/ray-train, NFS). None = a temporary directory (single-node clusters only).
    storage_path: str | None = field(default_factory=lambda: environment().storage)
    # The longest a job (erasure, training, curvature) may run: ray.get and trainer.fit wait no longer,
    # the job fails with a timeout error (in the receipt) and its Ray task is cancelled.
    job_timeout_s: float = field(default_factory=lambda: environment().job_timeout)

    def __post_init__(self) -> None:
        if not self.job_timeout_s > 0:
            raise ClusterError(f"job_timeout_s must be > 0, got {self.job_timeout_s!r}")
        if self.kind not in ("ray", "ray-train", "local"):
            raise ClusterError(f"runner kind must be 'ray', 'ray-train' or 'local', got {self.kind!r}")
        if self.num_workers < 1:
            raise ClusterError(f"num_workers must be >= 1, got {self.num_workers!r}")
        if self.max_failures < 0:
            raise ClusterError(f"max_failures must be >= 0, got {self.max_failures!r}")
        if self.cpus_per_worker < 0:
            raise ClusterError(f"cpus_per_worker must be >= 0, got {self.cpus_per_worker!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CoordinatorOptions:
    """How a tenant's coordinator batches, erases (the verified pipeline's knobs) and purges."""

    # Solver, membership test, remediation, retrain fallback and the guard's retained-loss bound.
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    max_batch: int = 32  # pending requests merged into one solve
    purge_grace_seconds: float | None = None  # None = the store's purge_grace_seconds
    max_head_conflicts: int = 3  # lost HEAD compare-and-swaps before a batch is failed
    solve: SolveConfig | None = None  # shorthand: replaces pipeline.solve when given
    # The coordinator actor builds HEAD's low-rank curvature with a curvature job after its rounds and
    # after onboarding, so the next erasure skips it (solver "eigen" only): one job per published version.
    warm_curvature: bool = True
    # The tenant's coordinator lease in S3 (tenants.lease): renewed every ttl/3 by its holder; a second
    # coordinator waits up to lease_wait_s for it to be released or lapse, then refuses (LeaseHeldError).
    lease_ttl_s: float = field(default_factory=lambda: environment().lease_ttl)
    lease_wait_s: float = field(default_factory=lambda: environment().lease_wait)
    # The reconciler retries a request that failed for a transient reason (a job lost or timed out, S3
    # unreachable) up to max_attempts times in all, waiting retry_backoff_s * 2**attempt (at most
    # retry_backoff_max_s) before each retry; a guard's or verifier's refusal is final.
    max_attempts: int = field(default_factory=lambda: environment().max_attempts)
    retry_backoff_s: float = field(default_factory=lambda: environment().retry_backoff)
    retry_backoff_max_s: float = 600.0
    # A published erasure whose replicas had not all confirmed the switch this long after it is
    # notified again (by the next round or the reconciler) until they do.
    redrive_after_s: float = field(default_factory=lambda: environment().redrive_after)

    def __post_init__(self) -> None:
        if not self.lease_ttl_s > 0:
            raise ClusterError(f"lease_ttl_s must be > 0, got {self.lease_ttl_s!r}")
        if self.lease_wait_s < 0:
            raise ClusterError(f"lease_wait_s must be >= 0, got {self.lease_wait_s!r}")
        if self.max_attempts < 1:
            raise ClusterError(f"max_attempts must be >= 1, got {self.max_attempts!r}")
        if self.retry_backoff_s < 0 or self.retry_backoff_max_s < 0:
            raise ClusterError(f"retry_backoff_s and retry_backoff_max_s must be >= 0, got "
                               f"{self.retry_backoff_s!r}, {self.retry_backoff_max_s!r}")
        if self.solve is not None:
            object.__setattr__(self, "pipeline", replace(self.pipeline, solve=self.solve))
        if self.max_batch < 1:
            raise ClusterError(f"max_batch must be >= 1, got {self.max_batch!r}")
        if self.purge_grace_seconds is not None and self.purge_grace_seconds < 0:
            raise ClusterError(f"purge_grace_seconds must be >= 0, got {self.purge_grace_seconds!r}")

    def to_dict(self) -> dict:
        return {"pipeline": self.pipeline.to_dict(), "max_batch": self.max_batch,
                "purge_grace_seconds": self.purge_grace_seconds, "warm_curvature": self.warm_curvature,
                "lease_ttl_s": self.lease_ttl_s, "lease_wait_s": self.lease_wait_s, "max_attempts": self.max_attempts,
                "retry_backoff_s": self.retry_backoff_s}
