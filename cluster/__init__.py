"""cluster: the method on a Ray cluster: jobs (Ray Train for several workers, a pooled Ray task for one),
per-tenant erasure coordinators that also warm each adapter version's curvature, batch entry.

Imports eraser, tenants and ray (never serve). What other layers call:
``RayErasureService(store_settings).submit(request)`` and ``register_publish_hook(name, hook)``.
"""

from cluster.actors import ActorMethodHook, get_coordinator, register_publish_hook, unregister_publish_hook
from cluster.config import CoordinatorOptions, RunnerSpec
from cluster.coordinator import BatchReport, ErasureCoordinator, PublishHook
from cluster.errors import (
    AlreadyOnboardedError,
    ClusterError,
    CoordinatorMismatchError,
    GuardRejectedError,
    JobFailedError,
    NotOnboardedError,
)
from cluster.jobs import CurvatureJob, ErasureJob, JobResult, TrainingJob
from cluster.runners import JobRunner, LocalJobRunner, RayTaskJobRunner, RayTrainJobRunner, make_runner
from cluster.service import ErasureService, LocalErasureService, RayErasureService

__all__ = [
    "ActorMethodHook",
    "AlreadyOnboardedError",
    "BatchReport",
    "ClusterError",
    "CoordinatorMismatchError",
    "CoordinatorOptions",
    "ErasureCoordinator",
    "CurvatureJob",
    "ErasureJob",
    "ErasureService",
    "GuardRejectedError",
    "JobFailedError",
    "JobResult",
    "JobRunner",
    "LocalErasureService",
    "LocalJobRunner",
    "NotOnboardedError",
    "PublishHook",
    "RayErasureService",
    "RayTaskJobRunner",
    "RayTrainJobRunner",
    "RunnerSpec",
    "TrainingJob",
    "get_coordinator",
    "make_runner",
    "register_publish_hook",
    "unregister_publish_hook",
]
