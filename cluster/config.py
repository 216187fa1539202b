"""How jobs run and how a coordinator decides: frozen dataclasses that travel into Ray actors.

Defaults live here, each readable from an ``ERASER_CLUSTER_*`` environment variable (read when the
object is built, so a Ray job's ``runtime_env`` sets them for every process it starts).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from eraser.influence import SolveConfig
from eraser.pipeline import PipelineConfig

from cluster.errors import ClusterError

NAMESPACE = os.environ.get("ERASER_CLUSTER_NAMESPACE", "eraser")  # Ray namespace of coordinators and hooks
COORDINATOR_PREFIX = "eraser-coordinator:"  # + tenant: the named actor of that tenant


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else default


# How long a caller waits for a quick actor call (submit, describe, purge, hooks) before giving up.
CALL_TIMEOUT_S = _env_float("ERASER_CLUSTER_CALL_TIMEOUT", 120.0)
# How long a caller waits for a tenant's coordinator to finish its rounds (process, purge behind a round).
ROUND_TIMEOUT_S = _env_float("ERASER_CLUSTER_ROUND_TIMEOUT", 4 * 3600.0)
# How often the reconciler (cluster.reconciler) looks for stalled work, after its first pass at start.
RECONCILE_INTERVAL_S = _env_float("ERASER_CLUSTER_RECONCILE_INTERVAL", 30.0)


def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return value.strip().lower() in ("1", "true", "yes") if value not in (None, "") else default


@dataclass(frozen=True)
class RunnerSpec:
    """Which job runner executes erasure and training jobs, and with what resources."""

    # ray: on the Ray cluster, Ray Train (TorchTrainer) for more than one worker and a pooled Ray task for
    # one (a Train launch costs ~16 s on 2 cores); ray-train: always Train; local: this process, world size 1.
    kind: Literal["ray", "ray-train", "local"] = field(
        default_factory=lambda: os.environ.get("ERASER_CLUSTER_RUNNER") or "ray")
    num_workers: int = field(default_factory=lambda: _env_int("ERASER_CLUSTER_WORKERS", 1))  # workers per erasure
    use_gpu: bool = field(default_factory=lambda: _env_bool("ERASER_CLUSTER_USE_GPU", False))  # one GPU per worker, NCCL
    # CPUs each job (a Train worker, a pooled task, the import check) reserves.
    cpus_per_worker: float = field(default_factory=lambda: _env_float("ERASER_CLUSTER_CPUS_PER_WORKER", 1.0))
    max_failures: int = field(default_factory=lambda: _env_int("ERASER_CLUSTER_MAX_FAILURES", 1))  # Train retries after a worker dies
    # Where Train puts result checkpoints: a local directory (one node) or a URI every node reaches
    # (s3://bucket/ray-train, NFS). None = a temporary directory (single-node clusters only).
    storage_path: str | None = field(default_factory=lambda: os.environ.get("ERASER_CLUSTER_STORAGE") or None)
    # The longest a job (erasure, training, curvature) may run: ray.get and trainer.fit wait no longer,
    # the job fails with a timeout error (in the receipt) and its Ray task is cancelled.
    job_timeout_s: float = field(default_factory=lambda: _env_float("ERASER_CLUSTER_JOB_TIMEOUT", 3600.0))

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
    lease_ttl_s: float = field(default_factory=lambda: _env_float("ERASER_CLUSTER_LEASE_TTL", 30.0))
    lease_wait_s: float = field(default_factory=lambda: _env_float("ERASER_CLUSTER_LEASE_WAIT", 60.0))
    # The reconciler retries a request that failed for a transient reason (a job lost or timed out, S3
    # unreachable) up to max_attempts times in all, waiting retry_backoff_s * 2**attempt (at most
    # retry_backoff_max_s) before each retry; a guard's or verifier's refusal is final.
    max_attempts: int = field(default_factory=lambda: _env_int("ERASER_CLUSTER_MAX_ATTEMPTS", 3))
    retry_backoff_s: float = field(default_factory=lambda: _env_float("ERASER_CLUSTER_RETRY_BACKOFF", 10.0))
    retry_backoff_max_s: float = 600.0
    # A published erasure whose replicas had not all confirmed the switch this long after it is
    # notified again (by the next round or the reconciler) until they do.
    redrive_after_s: float = field(default_factory=lambda: _env_float("ERASER_CLUSTER_REDRIVE_AFTER", 300.0))

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
