"""The reconciler: nothing in the ledger stalls for want of a trigger.

Coordinators run on a submit; the reconciler covers everything else. At service start and then every
``interval_s`` it reads each tenant's ledger, HEAD and lease and, where work is due, has that tenant's
coordinator run a round (the round, under the tenant's lease, does the work):

- ``pending``: a request whose hand-off to the coordinator was lost (an actor call that failed, a
  Ray restart, a client retry that found the receipt and triggered nothing);
- ``running`` with no live owner: the tenant's lease was released or lapsed (recovery completes it,
  or re-queues it);
- ``failed`` for a transient reason with attempts left and its backoff passed (the round re-queues it
  and records the attempt; see :func:`cluster.coordinator.retry_at`);
- ``published`` erasures past the purge grace period while superseded versions remain (purge);
- ``published`` erasures of HEAD's adapter whose replicas never confirmed the switch (re-notify);
- ``published`` erasures past the grace period not yet verified complete (``completed_at``), last
  checked ``redrive_after_s`` ago or never (the round checks again: :mod:`tenants.completion`).

A tenant whose lease is live is left to its holder. Each pass is bounded: one round per tenant with
due work, tenants one after another.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from tenants.errors import LeaseHeldError, TenantError
from tenants.lease import LeaseRecord
from tenants.models import ReceiptStatus
from tenants.store import TenantStore

from cluster.config import CoordinatorOptions
from cluster.coordinator import retry_at

logger = logging.getLogger(__name__)


def due_work(store: TenantStore, tenant: str, options: CoordinatorOptions, now: float | None = None) -> list[str]:
    """Why ``tenant``'s coordinator should run a round now (empty: nothing is due)."""
    now = time.time() if now is None else now
    found = store.io.get_model(store.layout.lease(tenant), LeaseRecord)
    lease_live = found is not None and not found[0].released and found[0].expires_at.timestamp() > now
    if lease_live:
        return []  # its holder is working: it finishes (or its lease lapses and a later pass takes over)
    receipts = store.list_receipts(tenant)
    reasons: list[str] = []
    by_status: dict[ReceiptStatus, list[Any]] = {}
    for receipt in receipts:
        by_status.setdefault(receipt.status, []).append(receipt)
    if by_status.get(ReceiptStatus.pending):
        reasons.append(f"{len(by_status[ReceiptStatus.pending])} pending")
    if by_status.get(ReceiptStatus.running):
        reasons.append(f"{len(by_status[ReceiptStatus.running])} running with no live owner")
    retries = [r for r in by_status.get(ReceiptStatus.failed, []) if (due := retry_at(r, options)) is not None
               and due <= now]
    if retries:
        reasons.append(f"{len(retries)} transient failure(s) due for a retry")
    published = by_status.get(ReceiptStatus.published, [])
    grace = options.purge_grace_seconds
    grace = store.settings.purge_grace_seconds if grace is None else grace
    if any(r.published_at is not None and r.published_at.timestamp() + grace <= now for r in published):
        head, _ = store.get_head(tenant)
        superseded = [v for v in store.list_adapter_versions(tenant) if head is None or v != head.adapter]
        superseded += [v for v in store.list_data_versions(tenant) if head is None or v != head.data]
        if superseded:
            reasons.append(f"purge due ({len(superseded)} superseded version(s))")
    unswitched = [r for r in published if r.replicas_switched_at is None and r.published_at is not None
                  and r.published_at.timestamp() + options.redrive_after_s <= now]
    if unswitched:
        reasons.append(f"{len(unswitched)} published without every replica switched")
    # a check that failed is retried after redrive_after_s: what failed it (a purge, a switch, the data) needs time
    unverified = [r for r in published if r.completed_at is None and r.published_at is not None
                  and r.published_at.timestamp() + grace <= now
                  and (r.completion is None or r.completion.checked_at.timestamp() + options.redrive_after_s <= now)]
    if unverified:
        reasons.append(f"{len(unverified)} published not yet verified complete")
    return reasons


class Reconciler:
    """Runs :meth:`reconcile_once` now and every ``interval_s`` in a daemon thread (:meth:`start`).

    ``run_tenant(tenant)`` has the tenant's coordinator run a round: in process
    (``ErasureCoordinator.run_until_idle``) or by kicking its Ray actor. ``switch_hooks``: whether
    publish hooks exist (without any, unswitched replicas are not a reason to run).
    """

    def __init__(self, store: TenantStore, run_tenant: Callable[[str], Any], options: CoordinatorOptions | None = None,
                 interval_s: float = 30.0, switch_hooks: Callable[[], bool] = lambda: True) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self.store, self.run_tenant = store, run_tenant
        self.options = options or CoordinatorOptions()
        self.interval_s = interval_s
        self.switch_hooks = switch_hooks
        self.passes = 0
        self.runs: list[tuple[str, list[str]]] = []  # (tenant, reasons) of every round it started
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reconcile_once(self) -> dict[str, list[str]]:
        """One pass over every tenant; returns {tenant: reasons} of the tenants it ran a round for."""
        started: dict[str, list[str]] = {}
        try:
            tenants = self.store.list_tenants()
        except TenantError as error:
            logger.warning("reconciler: cannot list tenants (next pass retries): %s", error)
            return started
        hooks = self.switch_hooks()
        for tenant in tenants:
            try:
                reasons = [r for r in due_work(self.store, tenant, self.options)
                           if hooks or "replica" not in r]
            except TenantError as error:
                logger.warning("reconciler: tenant %s unreadable (next pass retries): %s", tenant, error)
                continue
            if not reasons:
                continue
            logger.info("reconciler: tenant %s: %s: running a round", tenant, "; ".join(reasons))
            started[tenant] = reasons
            self.runs.append((tenant, reasons))
            try:
                self.run_tenant(tenant)
            except LeaseHeldError as error:  # another coordinator took it meanwhile: its business now
                logger.info("reconciler: tenant %s: %s", tenant, error)
            except Exception as error:  # noqa: BLE001 (one tenant's fault never stops the others)
                logger.warning("reconciler: tenant %s: round failed (next pass retries): %s", tenant, error)
        self.passes += 1
        return started

    def start(self) -> "Reconciler":
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, daemon=True, name="eraser-reconciler")
            self._thread.start()
            logger.info("reconciler started: a pass now and every %.0f s", self.interval_s)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 5)
        self._thread = None

    def _loop(self) -> None:
        while True:
            try:
                self.reconcile_once()
            except Exception:  # noqa: BLE001
                logger.exception("reconciler pass failed (next pass retries)")
            if self._stop.wait(self.interval_s):
                return
