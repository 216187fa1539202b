"""The entry point other layers call: submit erasures, onboard or import tenants, register the publish hook.

Two implementations of one small interface:

- :class:`RayErasureService`: per-tenant coordinator actors on a Ray cluster (the serving layer,
  ``eraser tenants ... --address``, the batch job);
- :class:`LocalErasureService`: the same coordinators in this process (``--local``, unit tests).

Serving wires it as ``RayErasureService(store_settings).submit(receipt)`` from its backend and
``register_publish_hook(name, hook)`` once at start, with ``hook(tenant, head)`` telling every
replica to switch (returning ``{"switched_at": ...}`` when they have). ``import_tenant`` brings in
an adapter trained elsewhere; the method checks it against its base first (in a Ray task for the Ray
service, so the caller never loads a model).
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Sequence

from tenants.models import ErasureRequest, Head, Receipt, Record, TenantConfig
from tenants.settings import StoreSettings
from tenants.store import TenantStore, adapter_files

from cluster.adapter_import import check_import, check_import_in_task, import_evidence
from cluster.config import (
    CALL_TIMEOUT_S,
    NAMESPACE,
    RECONCILE_INTERVAL_S,
    ROUND_TIMEOUT_S,
    CoordinatorOptions,
    RunnerSpec,
)
from cluster.coordinator import ErasureCoordinator, PublishHook
from cluster.errors import ClusterError
from cluster.runners import JobRunner, make_runner

logger = logging.getLogger(__name__)

TERMINAL = ("published", "failed", "rejected")


def ray_get(refs: Any, timeout_s: float, what: str) -> Any:
    """``ray.get`` that waits at most ``timeout_s``: ClusterError naming ``what`` and the setting when it fires."""
    import ray

    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as error:
        raise ClusterError(f"{what} did not answer within {timeout_s:g} s (ERASER_CLUSTER_CALL_TIMEOUT / "
                           "ERASER_CLUSTER_ROUND_TIMEOUT / ERASER_CLUSTER_JOB_TIMEOUT)") from error


def as_request(request: ErasureRequest | Receipt | dict) -> ErasureRequest:
    if isinstance(request, Receipt):
        return request.request
    if isinstance(request, ErasureRequest):
        return request
    return ErasureRequest.model_validate(request)


class ErasureService(abc.ABC):
    """Submit erasures and onboard tenants; every tenant's work goes through its one coordinator."""

    def __init__(self, store_settings: StoreSettings) -> None:
        self.store_settings = store_settings
        self.store = TenantStore(store_settings)

    @abc.abstractmethod
    def submit(self, request: ErasureRequest | Receipt | dict, start: bool = True) -> Receipt:
        """Record the request (pending, idempotent by request id); with ``start`` schedule a round in the
        background (the Ray service; the local one runs in :meth:`process`). Returns at once.
        ``start=False`` lets a caller record many requests first so they share one solve."""

    @abc.abstractmethod
    def process(self, tenants: Sequence[str]) -> dict[str, list[dict]]:
        """Run every pending request of ``tenants`` to a final state (tenants in parallel); blocks."""

    @abc.abstractmethod
    def onboard(self, tenant: str, data_version: str | None = None) -> str:
        """Train and publish the tenant's first adapter, create HEAD; returns the adapter version. Blocks."""

    @abc.abstractmethod
    def register_publish_hook(self, name: str, hook: PublishHook) -> None:
        """Have ``hook(tenant, head)`` called after every HEAD move."""

    def purge_due(self, tenants: Sequence[str]) -> None:
        """Purge what is past its grace period now, then stamp the receipts that makes complete (a round
        does both too)."""

    @abc.abstractmethod
    def run_round(self, tenant: str) -> None:
        """Have the tenant's coordinator run a round (recover, retry, erase, purge, re-notify)."""

    def has_hooks(self) -> bool:
        return True

    def start_reconciler(self, interval_s: float | None = None):
        """Start the reconciler (:mod:`cluster.reconciler`): a pass now, then every ``interval_s``
        (default ``ERASER_CLUSTER_RECONCILE_INTERVAL``). Returns it (``.stop()`` ends it)."""
        from cluster.reconciler import Reconciler

        return Reconciler(self.store, self.run_round, self.options, interval_s or RECONCILE_INTERVAL_S,
                          switch_hooks=self.has_hooks).start()

    def check_import(self, config: TenantConfig, adapter_dir: Path, records: list[Record]) -> dict:
        """The method's checks of an adapter to import (``cluster.adapter_import.check_import``), in this process."""
        return check_import(self.store_settings, config, adapter_dir, records)

    def import_tenant(self, config: TenantConfig, adapter_dir: str | Path, records: Iterable[Record | dict],
                      reference: Iterable[Record | dict], via: str | None = None) -> Head:
        """Bring in a tenant with an adapter trained elsewhere (``TenantStore.import_tenant``), the
        adapter checked by the method (:meth:`check_import`) before anything is written. Returns HEAD."""
        return self.store.import_tenant(config, adapter_dir, records, reference, check=self.check_import, via=via)

    def receipts(self, tenant: str, request_ids: Iterable[str]) -> list[Receipt]:
        return [self.store.get_receipt(tenant, request_id) for request_id in request_ids]

    def wait(self, tenant: str, request_ids: Sequence[str], timeout_s: float = 600.0, poll_s: float = 1.0) -> list[Receipt]:
        """Poll the ledger until every request is published, failed or rejected (ClusterError on timeout).

        'published' is set at the HEAD move. Notifying replicas and purging superseded versions come
        after it, so a receipt returned here may not list its purge yet: call :meth:`purge_due`
        (it runs behind the tenant's round) and read the receipt again to see it.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            receipts = self.receipts(tenant, request_ids)
            if all(r.status.value in TERMINAL for r in receipts):
                return receipts
            if time.monotonic() > deadline:
                open_ = [r.request_id for r in receipts if r.status.value not in TERMINAL]
                raise ClusterError(f"tenant {tenant!r}: requests {open_} not finished after {timeout_s:.0f}s")
            time.sleep(poll_s)


class LocalErasureService(ErasureService):
    """Coordinators in this process (one per tenant, kept), jobs by ``runner`` (default in-process)."""

    def __init__(self, store_settings: StoreSettings, runner: JobRunner | RunnerSpec | None = None,
                 options: CoordinatorOptions | None = None, heartbeat_dir: str | None = None) -> None:
        super().__init__(store_settings)
        self.runner = runner if isinstance(runner, JobRunner) else make_runner(runner or RunnerSpec(kind="local"))
        self.options = options or CoordinatorOptions()
        self.heartbeat_dir = heartbeat_dir
        self._hooks: dict[str, PublishHook] = {}
        self._coordinators: dict[str, ErasureCoordinator] = {}
        self._guard = threading.Lock()

    def coordinator(self, tenant: str) -> ErasureCoordinator:
        with self._guard:
            if tenant not in self._coordinators:
                self.store.get_tenant(tenant)  # TenantNotFoundError first
                self._coordinators[tenant] = ErasureCoordinator(
                    tenant, self.store, self.runner, self.options, hooks=lambda: list(self._hooks.values()),
                    heartbeat_dir=self.heartbeat_dir)
            return self._coordinators[tenant]

    def submit(self, request: ErasureRequest | Receipt | dict, start: bool = True) -> Receipt:
        request = as_request(request)
        return self.coordinator(request.tenant).submit(request)

    def process(self, tenants: Sequence[str]) -> dict[str, list[dict]]:
        tenants = list(dict.fromkeys(tenants))
        if not tenants:
            return {}
        with ThreadPoolExecutor(max_workers=len(tenants)) as pool:
            results = pool.map(lambda t: self.coordinator(t).run_until_idle(), tenants)
            return {t: [vars(r) for r in reports] for t, reports in zip(tenants, results)}

    def onboard(self, tenant: str, data_version: str | None = None) -> str:
        return self.coordinator(tenant).onboard(data_version)

    def register_publish_hook(self, name: str, hook: PublishHook) -> None:
        self._hooks[name] = hook

    def run_round(self, tenant: str) -> None:
        self.coordinator(tenant).run_until_idle()

    def has_hooks(self) -> bool:
        return bool(self._hooks)

    def purge_due(self, tenants: Sequence[str]) -> None:
        for tenant in tenants:
            self.coordinator(tenant).purge_due()
            self.coordinator(tenant).complete_due()


class RayErasureService(ErasureService):
    """Coordinator actors on the connected Ray cluster (``ray.init`` first, or pass ``address``)."""

    def __init__(self, store_settings: StoreSettings, runner: RunnerSpec | None = None,
                 options: CoordinatorOptions | None = None, namespace: str = NAMESPACE,
                 address: str | None = None, heartbeat_dir: str | None = None) -> None:
        import ray

        super().__init__(store_settings)
        if not ray.is_initialized():
            ray.init(address=address, namespace=namespace, log_to_driver=True)
        self.runner = runner or RunnerSpec()
        self.options = options or CoordinatorOptions()
        self.namespace = namespace
        self.heartbeat_dir = heartbeat_dir

    def coordinator(self, tenant: str):
        """The tenant's actor handle (get-or-create)."""
        from cluster.actors import get_coordinator

        self.store.get_tenant(tenant)  # TenantNotFoundError before creating an actor for nobody
        return get_coordinator(tenant, self.store_settings, self.runner, self.options, self.namespace,
                               self.heartbeat_dir)

    def submit(self, request: ErasureRequest | Receipt | dict, start: bool = True) -> Receipt:
        request = as_request(request)
        body = ray_get(self.coordinator(request.tenant).submit.remote(request.model_dump(mode="json"), start),
                       CALL_TIMEOUT_S, f"the coordinator of tenant {request.tenant!r} (submit)")
        return Receipt.model_validate(body)

    def process(self, tenants: Sequence[str]) -> dict[str, list[dict]]:
        tenants = list(dict.fromkeys(tenants))
        refs = {tenant: self.coordinator(tenant).run_until_idle.remote() for tenant in tenants}
        return {tenant: ray_get(ref, ROUND_TIMEOUT_S, f"the coordinator of tenant {tenant!r} (its rounds)")
                for tenant, ref in refs.items()}

    def run_round(self, tenant: str) -> None:
        self.coordinator(tenant).kick.remote()  # the actor runs it in the background (coalesced)

    def has_hooks(self) -> bool:
        from cluster.actors import registered_hooks

        return bool(registered_hooks(self.namespace))

    def process_async(self, tenants: Sequence[str]) -> dict[str, Any]:
        """Start rounds for ``tenants``; returns ``{tenant: ObjectRef}`` (for progress displays)."""
        return {tenant: self.coordinator(tenant).run_until_idle.remote() for tenant in dict.fromkeys(tenants)}

    def onboard(self, tenant: str, data_version: str | None = None) -> str:
        return ray_get(self.coordinator(tenant).onboard.remote(data_version),
                       self.runner.job_timeout_s + CALL_TIMEOUT_S, f"the coordinator of tenant {tenant!r} (onboard)")

    def register_publish_hook(self, name: str, hook: PublishHook) -> None:
        from cluster.actors import register_publish_hook

        register_publish_hook(name, hook, self.namespace)

    def purge_due(self, tenants: Sequence[str]) -> None:
        ray_get([self.coordinator(tenant).purge_due.remote() for tenant in dict.fromkeys(tenants)], ROUND_TIMEOUT_S,
                f"the coordinators of {sorted(set(tenants))} (purge)")

    def check_import(self, config: TenantConfig, adapter_dir: Path, records: list[Record]) -> dict:
        """The method's checks in a Ray task (the caller, e.g. the HTTP ingress, loads no model): the adapter's
        files travel by value, since the task may run on another node. The store's errors come back as such."""
        import ray

        files = {name: (Path(adapter_dir) / name).read_bytes() for name in adapter_files(Path(adapter_dir))}
        task = ray.remote(check_import_in_task).options(num_cpus=self.runner.cpus_per_worker, max_retries=0)
        body = ray_get(task.remote(self.store_settings, config.model_dump(mode="json"), files,
                                   [r.model_dump(mode="json", exclude_none=True) for r in records]),
                       self.runner.job_timeout_s, f"the import check of tenant {config.name!r}")
        return import_evidence(body)
