"""The adapter board: tells every engine replica that a tenant's HEAD moved, and collects when each
one has switched, so the erasure path can record when the *last* replica dropped the old version.

It is a Serve deployment of its own (one replica, no CPU) so that it lives and dies with the
application. Engine replicas long-poll :meth:`AdapterBoard.watch`; whoever moved HEAD calls
:meth:`AdapterBoard.publish`, or from outside the application (the cluster layer, a batch job)
:class:`SwitchNotifier`, a picklable callable that finds the board by application name.
A replica that is not reachable keeps its refresh loop (HEAD polled every few seconds) as a fallback.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone
from typing import Any

logger = logging.getLogger(__name__)

BOARD_DEPLOYMENT = "AdapterBoard"
MAX_CHANGES = 1000  # changes kept for replicas that fell behind; older ones mean "refresh all"
ALL = "*"


class AdapterBoard:
    """Change feed and switch ledger, per application. All state is in memory (HEAD lives in S3)."""

    def __init__(self, liveness_s: float = 45.0, watch_timeout_s: float = 15.0) -> None:
        self.liveness_s = liveness_s
        self.watch_timeout_s = watch_timeout_s
        self._epoch = 0
        self._changes: list[tuple[int, str]] = []  # (epoch, tenant)
        self._seen: dict[str, float] = {}  # replica -> last time it called watch()
        self._reports: dict[tuple[str, str], dict[str, Any]] = {}  # (tenant, replica) -> SwitchEvent dict
        self._changed = asyncio.Condition()
        self._reported = asyncio.Condition()
        self._key_epoch = 0
        self._revoked: list[tuple[int, str, str]] = []  # (epoch, tenant, key id)
        self._keys_changed = asyncio.Event()  # replaced at each revocation (no lock: nothing to deadlock on cancel)

    # -- engine replicas ----------------------------------------------------------------------

    async def watch(self, replica: str, since: int, timeout_s: float | None = None) -> tuple[int, list[str]]:
        """Wait until a change after epoch ``since`` (or the timeout); returns (epoch, tenants changed).

        ``since=-1`` registers the replica and returns the current epoch at once. ``["*"]`` means
        "refresh every tenant you hold" (the replica fell too far behind).
        """
        self._seen[replica] = time.time()
        if since >= 0:
            async with self._changed:
                try:
                    await asyncio.wait_for(self._changed.wait_for(lambda: self._epoch > since),
                                           timeout_s or self.watch_timeout_s)
                except asyncio.TimeoutError:
                    pass
        self._seen[replica] = time.time()
        if since < 0 or self._epoch <= since:
            return self._epoch, []
        if self._changes and self._changes[0][0] > since + 1:
            return self._epoch, [ALL]
        return self._epoch, sorted({tenant for epoch, tenant in self._changes if epoch > since})

    async def report(self, replica: str, event: dict[str, Any]) -> None:
        """A replica's :class:`serve.adapters.SwitchEvent` (as a dict) for one tenant."""
        self._seen[replica] = time.time()
        self._reports[(event["tenant"], replica)] = event
        async with self._reported:
            self._reported.notify_all()

    async def leave(self, replica: str) -> None:
        """A replica shutting down: stop waiting for it."""
        self._seen.pop(replica, None)
        async with self._reported:
            self._reported.notify_all()

    # -- ingress replicas: API key revocations ---------------------------------------------

    async def revoke_key(self, tenant: str, key_id: str) -> int:
        """Tell every ingress replica to forget a key it trusts (already removed from the store)."""
        self._key_epoch += 1
        self._revoked.append((self._key_epoch, tenant, key_id))
        del self._revoked[:-MAX_CHANGES]
        changed, self._keys_changed = self._keys_changed, asyncio.Event()
        changed.set()
        logger.info("tenant %s: API key %s revoked; ingress replicas told (epoch %d)", tenant, key_id, self._key_epoch)
        return self._key_epoch

    async def watch_keys(self, since: int, timeout_s: float | None = None) -> tuple[int, list[list[str]]]:
        """Wait for revocations after epoch ``since`` (or the timeout); returns (epoch, [[tenant, key id]]).

        ``since=-1`` returns the current epoch at once; ``[["*", "*"]]``: forget every key (fell behind).
        """
        if 0 <= since and self._key_epoch <= since:
            try:
                await asyncio.wait_for(self._keys_changed.wait(), timeout_s or self.watch_timeout_s)
            except asyncio.TimeoutError:
                pass
        if since < 0 or self._key_epoch <= since:
            return self._key_epoch, []
        if self._revoked and self._revoked[0][0] > since + 1:
            return self._key_epoch, [[ALL, ALL]]
        return self._key_epoch, [[tenant, key_id] for epoch, tenant, key_id in self._revoked if epoch > since]

    # -- whoever moved HEAD -------------------------------------------------------------------

    async def publish(self, tenant: str, version: str | None, timeout_s: float = 120.0) -> dict[str, Any]:
        """Tell every replica that ``tenant``'s HEAD moved to ``version``; wait until each live replica
        serves it (or a later one) and has dropped the old version, or until ``timeout_s``.

        Returns ``{"tenant", "version", "complete", "switched_at", "serving_at", "replicas", "missing"}``:
        ``switched_at`` (ISO time) is when the last replica dropped the old version, None if one
        did not within the timeout (``missing`` names those).
        """
        started = time.time()
        waiting = set(self._live())
        async with self._changed:
            self._epoch += 1
            self._changes.append((self._epoch, tenant))
            del self._changes[:-MAX_CHANGES]
            self._changed.notify_all()
        # reports made before this publish do not count: a replica reports after re-reading HEAD
        for replica in waiting:
            previous = self._reports.get((tenant, replica))
            if previous is not None and previous.get("started_at", 0) < started:
                self._reports.pop((tenant, replica), None)

        def pending() -> set[str]:
            live = set(self._live())
            return {r for r in waiting & live if not _done(self._reports.get((tenant, r)), version)}

        async with self._reported:
            try:
                await asyncio.wait_for(self._reported.wait_for(lambda: not pending()), timeout_s)
            except asyncio.TimeoutError:
                pass
        missing = sorted(pending())
        reports = {r: self._reports[(tenant, r)] for r in waiting if (tenant, r) in self._reports}
        dropped = [e["dropped_at"] for e in reports.values() if e.get("dropped_at") is not None]
        serving = [e["serving_at"] for e in reports.values() if e.get("serving_at") is not None]
        result = {
            "tenant": tenant,
            "version": version,
            "complete": not missing,
            "notified_at": _iso(started),
            "switched_at": _iso(max(dropped, default=started)) if not missing else None,
            "serving_at": _iso(max(serving, default=started)) if not missing else None,
            "seconds": (max(dropped, default=started) - started) if not missing else None,
            "replicas": reports,
            "missing": missing,
        }
        logger.info("tenant %s: version %s on %d replicas, complete=%s, %.3fs", tenant, version, len(waiting),
                    result["complete"], time.time() - started)
        return result

    async def status(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "replicas": self._live(),
                "reports": {f"{t}/{r}": e for (t, r), e in self._reports.items()}}

    def _live(self) -> list[str]:
        now = time.time()
        return sorted(r for r, seen in self._seen.items() if now - seen <= self.liveness_s)


def _done(event: dict[str, Any] | None, version: str | None) -> bool:
    if event is None or event.get("dropped_at") is None:
        return False
    served = event.get("new_version")
    # fixed-width version names (v000001) order lexically; a later version also supersedes
    return version is None or served is None or served >= version


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat()


class SwitchNotifier:
    """``notifier(tenant, head) -> dict``: :meth:`AdapterBoard.publish` of a running application.

    ``head`` is a ``tenants.Head`` or an adapter version string. Picklable, so the cluster layer
    carries it into its coordinators as a publish hook (``cluster.register_publish_hook``): it is
    called right after HEAD moves, and the result's ``switched_at`` (when the last replica dropped
    the old version) goes on the receipt as ``replicas_switched_at``. Returns None (logged) when
    the application is not running; replicas then pick the move up by polling HEAD.
    """

    def __init__(self, app_name: str = "eraser", timeout_s: float = 120.0) -> None:
        self.app_name = app_name
        self.timeout_s = timeout_s

    def __call__(self, tenant: str, head: Any) -> dict[str, Any] | None:
        from ray import serve

        version = getattr(head, "adapter", head)
        try:
            board = serve.get_deployment_handle(BOARD_DEPLOYMENT, app_name=self.app_name)
            return board.publish.remote(tenant, version, self.timeout_s).result(timeout_s=self.timeout_s + 30)
        except Exception as error:
            logger.warning("tenant %s: no serving application %r to switch (%s); replicas will pick up HEAD by polling",
                           tenant, self.app_name, error)
            return None

    def __repr__(self) -> str:
        return f"SwitchNotifier(app={self.app_name!r})"
