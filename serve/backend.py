"""The seam between the HTTP ingress and whatever executes erasures and training (the cluster layer).

The ingress records an erasure request in the ledger itself (pending, idempotent by request id),
then hands the receipt to an :class:`ErasureBackend`. The backend runs the method, publishes the
new adapter version, moves HEAD, and then calls ``context.notify_switch(tenant, version)`` so every
serving replica switches at once; the returned ``switched_at`` belongs on the receipt as
``replicas_switched_at``.

``ServeConfig.erasure_backend`` names a factory ``'package.module:factory'`` taking a
:class:`BackendContext`; without one, :class:`PendingOnlyBackend` leaves requests pending for a
batch job (``ray job submit ... -- python -m cluster...``) to pick up.
"""

from __future__ import annotations

import abc
import importlib
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

from serve.errors import ServeConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendContext:
    """What a backend gets from the serving layer (all picklable, so it can travel into Ray tasks)."""

    store_settings: Any  # tenants.StoreSettings
    notify_switch: Callable[[str, str | None], dict[str, Any] | None]  # serve.board.SwitchNotifier
    app_name: str


class ErasureBackend(abc.ABC):
    """Executes recorded erasure requests and onboarding training (methods return quickly), and checks
    imported adapters with the method (:meth:`import_tenant`, which blocks)."""

    @abc.abstractmethod
    def submit(self, receipt) -> None:
        """Schedule a recorded (pending) erasure, ``receipt: tenants.Receipt``. Idempotent per request id."""

    def close(self) -> None:
        """Stop what the backend runs in the background (the ingress replica is shutting down)."""

    def train(self, tenant: str, data_version: str | None = None) -> dict[str, Any]:
        """Start training the tenant's first adapter on ``data_version`` (None = the latest); returns a
        description of the job. NotImplementedError when this backend does not train."""
        raise NotImplementedError(f"{type(self).__name__} does not train adapters")

    def import_tenant(self, config, adapter_dir, records, reference, via: str | None = None):
        """Create a tenant from an adapter trained elsewhere (``config: tenants.TenantConfig``, the records
        it trained on and the reference records it never saw); returns its HEAD (``tenants.Head``). Blocks
        while the method checks the adapter against its base. NotImplementedError when this backend has
        no method to check it with (nothing is written then)."""
        raise NotImplementedError(f"{type(self).__name__} cannot check an adapter against its base model; "
                                  "configure a cluster erasure backend or use `eraser tenants import`")


class PendingOnlyBackend(ErasureBackend):
    """Records only: requests stay pending in the ledger until a batch job runs them."""

    def __init__(self, context: BackendContext | None = None) -> None:
        self.context = context

    def submit(self, receipt) -> None:
        logger.info("tenant %s: erasure %s recorded; no erasure backend configured, it stays pending",
                    receipt.tenant, receipt.request_id)


class ClusterBackend(ErasureBackend):
    """Erasures and onboarding run by the cluster layer's per-tenant coordinators.

    ``service`` is a ``cluster.ErasureService``: :class:`cluster.RayErasureService` (coordinator
    actors on the Ray cluster this application runs on) or :class:`cluster.LocalErasureService`
    (in this process). The application's :class:`serve.board.SwitchNotifier` is registered as a
    publish hook, so after every HEAD move the coordinator waits for the replicas to switch and
    stamps ``replicas_switched_at`` on the receipts.
    """

    def __init__(self, service, context: BackendContext) -> None:
        self.service = service
        self.context = context
        service.register_publish_hook(f"serve:{context.app_name}", context.notify_switch)
        # Stalled work (lost hand-offs, orphaned or transiently failed requests, due purges, unconfirmed
        # replica switches) is picked up at start and then periodically (cluster.reconciler).
        self.reconciler = service.start_reconciler() if hasattr(service, "start_reconciler") else None

    def close(self) -> None:
        if self.reconciler is not None:
            self.reconciler.stop()

    def submit(self, receipt) -> None:
        self.service.submit(receipt)  # a coordinator actor schedules its own round
        if not hasattr(self.service, "process_async"):  # in-process coordinators: run the round here
            threading.Thread(target=self._process, args=(receipt.tenant,), daemon=True,
                             name=f"erasures-{receipt.tenant}").start()

    def _process(self, tenant: str) -> None:
        try:
            self.service.process([tenant])
        except Exception:
            logger.exception("tenant %s: erasure round failed", tenant)

    def train(self, tenant: str, data_version: str | None = None) -> dict[str, Any]:
        coordinator = getattr(self.service, "coordinator", None)
        handle = coordinator(tenant) if coordinator is not None else None
        if handle is not None and hasattr(handle, "onboard") and hasattr(handle.onboard, "remote"):
            handle.onboard.remote(data_version)  # the coordinator actor runs it; HEAD moves when done
        else:
            threading.Thread(target=self.service.onboard, args=(tenant, data_version), daemon=True,
                             name=f"onboard-{tenant}").start()
        return {"status": "started", "tenant": tenant, "data_version": data_version}

    def import_tenant(self, config, adapter_dir, records, reference, via: str | None = None):
        return self.service.import_tenant(config, adapter_dir, records, reference, via=via)


def cluster_backend(context: BackendContext) -> ClusterBackend:
    """Coordinator actors on the Ray cluster (Ray Train jobs): ``erasure_backend: serve.backend:cluster_backend``."""
    from cluster.service import RayErasureService

    return ClusterBackend(RayErasureService(context.store_settings), context)


def local_cluster_backend(context: BackendContext) -> ClusterBackend:
    """Coordinators and jobs inside the ingress process (small machines, demos):
    ``erasure_backend: serve.backend:local_cluster_backend``."""
    from cluster.config import RunnerSpec
    from cluster.service import LocalErasureService

    return ClusterBackend(LocalErasureService(context.store_settings, runner=RunnerSpec(kind="local")), context)


def load_backend(spec: str | None, context: BackendContext) -> ErasureBackend:
    """The backend named by ``spec`` ('package.module:factory'), or :class:`PendingOnlyBackend`."""
    if not spec:
        return PendingOnlyBackend(context)
    module_name, _, attribute = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ServeConfigError(f"erasure_backend {spec!r} cannot be imported: {error}") from error
    backend = factory(context)
    if not isinstance(backend, ErasureBackend):
        raise ServeConfigError(f"erasure_backend {spec!r} returned {type(backend).__name__}, not an ErasureBackend")
    return backend
