"""Coordinators as named Ray actors (one per tenant, get-or-create) and the publish-hook registry.

``eraser-coordinator:<tenant>`` in namespace ``eraser`` (``ERASER_CLUSTER_NAMESPACE``) is a detached
actor: whoever asks first (the serve ingress, a batch job, the CLI) creates it, everyone after gets
the same one, so a tenant's requests are serialised across all entry points. It takes no CPU itself;
its jobs reserve the Train workers' resources. On (re)start it recovers from the ledger.

Publish hooks (``on_published(tenant, head)``) live in one detached registry actor,
``eraser-publish-hooks``, so a coordinator created by a batch job still notifies the serving layer
that registered a hook. A hook must be picklable; :class:`ActorMethodHook` calls a named actor.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray

from tenants.models import ErasureRequest, Head
from tenants.settings import StoreSettings
from tenants.store import TenantStore

from cluster.config import CALL_TIMEOUT_S, COORDINATOR_PREFIX, NAMESPACE, CoordinatorOptions, RunnerSpec
from cluster.coordinator import ErasureCoordinator, PublishHook
from cluster.errors import ClusterError, CoordinatorMismatchError
from cluster.runners import make_runner

logger = logging.getLogger(__name__)

HOOKS_ACTOR = "eraser-publish-hooks"


def coordinator_name(tenant: str) -> str:
    return f"{COORDINATOR_PREFIX}{tenant}"


def store_identity(settings: StoreSettings) -> str:
    """Which store a coordinator writes to (endpoint, bucket, prefix): two must never share a tenant."""
    return f"{settings.endpoint or 'aws'}|{settings.bucket}|{settings.prefix}"


# ---------------------------------------------------------------- publish hooks


class HookRegistry:
    """Named publish hooks (the Ray actor ``eraser-publish-hooks``)."""

    def __init__(self) -> None:
        self._hooks: dict[str, PublishHook] = {}

    def register(self, name: str, hook: PublishHook) -> None:
        self._hooks[name] = hook

    def unregister(self, name: str) -> bool:
        return self._hooks.pop(name, None) is not None

    def hooks(self) -> dict[str, PublishHook]:
        return dict(self._hooks)


def _registry(namespace: str, create: bool):
    if create:
        return ray.remote(HookRegistry).options(
            name=HOOKS_ACTOR, namespace=namespace, lifetime="detached", get_if_exists=True, num_cpus=0,
        ).remote()
    try:
        return ray.get_actor(HOOKS_ACTOR, namespace=namespace)
    except ValueError:
        return None


def register_publish_hook(name: str, hook: PublishHook, namespace: str = NAMESPACE) -> None:
    """Call ``hook(tenant, head)`` after every HEAD move by any coordinator of ``namespace``.

    ``head`` is a :class:`tenants.Head`. The hook may return ``{"switched_at": ...}`` once every
    serving replica switched; the coordinator then stamps ``replicas_switched_at`` on the receipts.
    Registering a name again replaces that hook.
    """
    ray.get(_registry(namespace, create=True).register.remote(name, hook), timeout=CALL_TIMEOUT_S)


def unregister_publish_hook(name: str, namespace: str = NAMESPACE) -> bool:
    registry = _registry(namespace, create=False)
    return bool(registry and ray.get(registry.unregister.remote(name), timeout=CALL_TIMEOUT_S))


class UnreadableHooks:
    """Stands in for the hooks of a registry that exists but could not be read: it fails like an
    unreachable hook, so no switch is confirmed and no receipt reads "no serving hook registered"."""

    def __init__(self, error: str) -> None:
        self.error = error

    def __call__(self, tenant: str, head: Head) -> Any:
        raise ClusterError(f"publish hooks unavailable: {self.error}")


def registered_hooks(namespace: str = NAMESPACE) -> list[PublishHook]:
    registry = _registry(namespace, create=False)
    if registry is None:
        return []
    try:
        return list(ray.get(registry.hooks.remote(), timeout=30).values())
    except Exception as error:  # a missing hook only delays serving (it polls HEAD too)
        logger.warning("publish hooks unavailable: %s", error)
        return [UnreadableHooks(str(error))]


class ActorMethodHook:
    """A publish hook that calls ``method(tenant, head_json)`` of a named actor and waits for it."""

    def __init__(self, actor_name: str, method: str = "on_published", namespace: str | None = None,
                 timeout_s: float = 60.0) -> None:
        self.actor_name, self.method, self.namespace, self.timeout_s = actor_name, method, namespace, timeout_s

    def __call__(self, tenant: str, head: Head) -> Any:
        actor = ray.get_actor(self.actor_name, namespace=self.namespace)
        return ray.get(getattr(actor, self.method).remote(tenant, head.model_dump(mode="json")), timeout=self.timeout_s)

    def __repr__(self) -> str:
        return f"ActorMethodHook({self.actor_name!r}.{self.method})"


# ---------------------------------------------------------------- the coordinator actor


class CoordinatorActor:
    """A tenant's coordinator in a Ray actor: one worker thread runs rounds; methods return quickly
    except :meth:`run_until_idle` and :meth:`onboard` (they wait for their turn)."""

    def __init__(self, tenant: str, settings: StoreSettings, runner: RunnerSpec, options: CoordinatorOptions,
                 namespace: str, heartbeat_dir: str | None = None) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.tenant = tenant
        self.identity = store_identity(settings)
        self.core = ErasureCoordinator(tenant, TenantStore(settings), make_runner(runner), options,
                                       hooks=lambda: registered_hooks(namespace), heartbeat_dir=heartbeat_dir)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"coordinator-{tenant}")
        self._state = threading.Lock()
        self._dirty = False
        self._running = False
        self._timer: threading.Timer | None = None
        self.last_error: str | None = None
        if self._ledger_has_work():  # a restarted coordinator picks up what the ledger holds (a new one
            self.kick()  # waits for its first submit, so requests recorded with start=False share one solve)

    def _ledger_has_work(self) -> bool:
        try:
            return any(r.status.value in ("pending", "running") for r in self.core.store.list_receipts(self.tenant))
        except Exception as error:  # noqa: BLE001 (S3 unreachable: kick anyway, the round says what is wrong)
            logger.warning("tenant %s: cannot read the ledger at start (%s); starting a round", self.tenant, error)
            return True

    def describe(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "store": self.identity, "runner": self.core.runner.describe(),
                "running": self._running, "last_error": self.last_error,
                "curvature_warmed_for": self.core.warmed_version}

    def submit(self, request: dict, start: bool = True) -> dict:
        """Record a request (pending, idempotent); with ``start``, schedule a round. Returns the receipt (JSON)."""
        receipt = self.core.submit(ErasureRequest.model_validate(request))
        if start:
            self.kick()
        return receipt.model_dump(mode="json")

    def kick(self) -> None:
        """Schedule a round in the background (coalesced: at most one queued behind the running one)."""
        with self._state:
            self._dirty = True
            if self._running:
                return
            self._running = True
        self._executor.submit(self._loop)

    def _loop(self) -> None:
        while True:
            with self._state:
                if not self._dirty:
                    self._running = False
                    break
                self._dirty = False
            try:
                self.core.run_until_idle()
                self.last_error = None
            except Exception as error:  # keep the actor alive; the ledger says what is left
                self.last_error = f"{type(error).__name__}: {error}"
                logger.exception("tenant %s: coordinator round failed", self.tenant)
        self._warm()
        self._schedule_purge()

    def _warm(self) -> None:
        """Warm HEAD's curvature while idle (a request that arrives meanwhile queues behind it)."""
        try:
            self.core.warm_curvature()
        except Exception:  # noqa: BLE001 (best effort: the next erasure job builds it)
            logger.exception("tenant %s: warming the curvature failed", self.tenant)

    def _schedule_purge(self) -> None:
        try:
            wait = self.core.pending_purge_at()
        except Exception:  # noqa: BLE001 (best effort; the next round purges anyway)
            return
        if wait is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(wait + 0.5, self.kick)
        self._timer.daemon = True
        self._timer.start()

    def run_until_idle(self) -> list[dict]:
        """Run rounds until nothing is pending (waits behind a background round); returns the batch reports.
        The new HEAD's curvature is then warmed in the background."""
        future = self._executor.submit(self.core.run_until_idle)
        reports = [vars(report) for report in future.result()]
        if reports:
            self.kick()
        return reports

    def onboard(self, data_version: str | None = None) -> str:
        """Train and publish the tenant's first adapter (serialised with its erasures); returns the version.
        A background round then warms its curvature for the first erasure."""
        version = self._executor.submit(self.core.onboard, data_version).result()
        self.kick()
        return version

    def purge_due(self) -> list[dict]:
        """Purge what is due, then check which receipts that makes complete; returns the purge entries."""
        return self._executor.submit(self._purge_and_complete).result()

    def _purge_and_complete(self) -> list[dict]:
        entries = self.core.purge_due()
        self.core.complete_due()
        return entries

    def pending_purge_at(self) -> float | None:
        return self.core.pending_purge_at()


def get_coordinator(
    tenant: str,
    settings: StoreSettings,
    runner: RunnerSpec | None = None,
    options: CoordinatorOptions | None = None,
    namespace: str = NAMESPACE,
    heartbeat_dir: str | None = None,
):
    """The tenant's coordinator actor, created if it does not exist (get-or-create, race-free).

    ``runner``/``options`` apply only when this call creates it. Raises CoordinatorMismatchError when
    the existing coordinator writes to another store.
    """
    handle = ray.remote(CoordinatorActor).options(
        name=coordinator_name(tenant), namespace=namespace, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_concurrency=16, max_restarts=3, max_task_retries=0,
    ).remote(tenant, settings, runner or RunnerSpec(), options or CoordinatorOptions(), namespace, heartbeat_dir)
    found = ray.get(handle.describe.remote(), timeout=CALL_TIMEOUT_S)
    if found["store"] != store_identity(settings):
        raise CoordinatorMismatchError(
            f"coordinator of tenant {tenant!r} in namespace {namespace!r} writes to {found['store']}, "
            f"not {store_identity(settings)}"
        )
    return handle


def stop_coordinator(tenant: str, namespace: str = NAMESPACE) -> bool:
    """Kill a tenant's coordinator actor (its ledger state stays; the next get creates a new one)."""
    try:
        ray.kill(ray.get_actor(coordinator_name(tenant), namespace=namespace), no_restart=True)
        return True
    except ValueError:
        return False
