"""Who is calling: API keys checked against the store, cached, rate-limited, and forgotten when revoked.

:class:`IngressAuth` is a base class of ``Ingress`` (:mod:`serve.ingress`): the per-replica key caches,
the failure counts per client address, the long-poll of the adapter board's key revocations, the
checks every route starts with (:meth:`~IngressAuth._tenant_key`, :meth:`~IngressAuth._allow_tenant`,
:meth:`~IngressAuth._admin`), and :meth:`~IngressAuth._store`, a store call off the event loop with
its errors as HTTP errors. It expects ``self.config``, ``self.store`` and ``self.board``.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import time
from typing import Any

from fastapi import Request

from serve.api_errors import ApiError, tenant_error
from serve.board import ALL
from serve.token_budget import TokenBudget

logger = logging.getLogger(__name__)


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if not header:
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", "missing_api_key")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, "malformed Authorization header: expected 'Bearer <key>'", "invalid_api_key")
    return key.strip()


def _key_id(api_key: str) -> str | None:
    from tenants.errors import AuthError
    from tenants.keys import parse_key

    try:
        return parse_key(api_key).key_id
    except AuthError:  # ERASER_ADMIN_KEY may have any form
        return None


class IngressAuth:
    """API keys and the store, for the routes of ``Ingress`` (a base class of it)."""

    def _init_guards(self) -> None:
        """This replica's key caches, failure counts, per-tenant generation counts (all empty) and
        per-tenant token buckets (None without ``tenant_tokens_per_minute``)."""
        self._auth: dict[str, tuple[str, float, str | None]] = {}  # sha256(key) -> (principal, expiry, key id)
        self._failed: dict[str, float] = {}  # sha256(key) -> refused without a check until then
        self._failures: dict[str, collections.deque] = {}  # client address -> times of its failed keys
        self._key_epoch: int | None = None  # the board's revocation epoch seen; None: not watching
        self._revocation_watcher: asyncio.Task | None = None
        self._running: dict[str, int] = {}  # tenant -> generations in flight on this replica
        per_minute = self.config.tenant_tokens_per_minute
        self._tokens = TokenBudget(per_minute) if per_minute is not None else None

    async def _principal(self, request: Request) -> str | None:
        """'tenant:<name>' or 'admin' for the request's valid key, None otherwise.

        A verified key is trusted for ``auth_cache_s`` (dropped at once when the board reports its
        revocation); a failed one is refused for ``auth_negative_cache_s`` without an S3 read or a
        scrypt; a client address past ``auth_failures_per_minute`` failures gets 429 for any key not
        already trusted.
        """
        from tenants.errors import AuthError, TenantError

        key = _bearer(request)
        client = request.client.host if request.client else "?"
        digest = hashlib.sha256(key.encode()).hexdigest()
        now = time.monotonic()
        cached = self._auth.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        self._watch_revocations()
        if self._failed.get(digest, 0.0) > now:
            self._count_failure(client, now)
            return None
        failures = self._failures.get(client)
        if failures and len(failures) >= self.config.auth_failures_per_minute and now - failures[0] < 60.0:
            retry = max(1, int(60.0 - (now - failures[0])) + 1)
            raise ApiError(429, f"too many failed API key attempts from this address; retry in {retry} s",
                           "too_many_failed_keys")
        epoch = self._key_epoch
        try:
            principal = f"tenant:{await asyncio.to_thread(self.store.authenticate, key)}"
        except AuthError:
            principal = "admin" if await asyncio.to_thread(self.store.verify_admin, key) else None
        except TenantError as error:
            raise tenant_error(error) from None
        if principal is None:
            self._count_failure(client, now)
            if self.config.auth_negative_cache_s > 0:
                if len(self._failed) > 100_000:
                    self._failed.clear()
                self._failed[digest] = now + self.config.auth_negative_cache_s
            return None
        # trusted only while revocations are being watched, and none came in during the check
        if self.config.auth_cache_s > 0 and epoch is not None and epoch == self._key_epoch:
            if len(self._auth) > 10_000:
                self._auth.clear()
            self._auth[digest] = (principal, now + self.config.auth_cache_s, _key_id(key))
        return principal

    def _count_failure(self, client: str, now: float) -> None:
        failures = self._failures.setdefault(client, collections.deque())
        while failures and now - failures[0] >= 60.0:
            failures.popleft()
        failures.append(now)
        while len(failures) > self.config.auth_failures_per_minute:
            failures.popleft()
        if len(self._failures) > 100_000:
            self._failures.clear()

    def _watch_revocations(self) -> None:
        """Start the long-poll of the board's key revocations (once, on this replica's event loop)."""
        if self._revocation_watcher is None or self._revocation_watcher.done():
            self._revocation_watcher = asyncio.get_running_loop().create_task(self._revocations())

    async def _revocations(self) -> None:
        since = -1
        while True:
            try:
                epoch, revoked = await self.board.watch_keys.remote(since)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # no board: nothing is trusted without a check until it is back
                logger.warning("ingress: adapter board unreachable for key revocations (%s)", error)
                self._key_epoch, since = None, -1
                self._auth.clear()
                await asyncio.sleep(1.0)
                continue
            self._forget(revoked)
            self._key_epoch = since = epoch

    def _forget(self, revoked: list[list[str]]) -> None:
        """Drop trusted keys that were revoked (``["*", "*"]``: all of them)."""
        for tenant, key_id in revoked:
            for digest, (principal, _, cached_key) in list(self._auth.items()):
                if tenant == ALL or (principal == f"tenant:{tenant}" and cached_key == key_id):
                    self._auth.pop(digest, None)
        if revoked:
            logger.info("ingress: forgot %d revoked API key(s)", len(revoked))

    def _stop_watching(self) -> None:
        """Cancel the revocation long-poll, from any thread, at any time (``Ingress.__del__`` calls it)."""
        watcher = getattr(self, "_revocation_watcher", None)  # None too if __init__ failed before the guards
        if watcher is None or watcher.done():
            return
        loop = watcher.get_loop()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            watcher.cancel()
        elif not loop.is_closed():
            loop.call_soon_threadsafe(watcher.cancel)

    async def _tenant_key(self, request: Request) -> str:
        """The tenant of the request's key (401 for no key, a bad key, or the admin key)."""
        principal = await self._principal(request)
        if principal is None:
            raise ApiError(401, "invalid API key", "invalid_api_key")
        if principal == "admin":
            raise ApiError(403, "the admin key has no model; use a tenant's API key", "permission_denied")
        return principal.split(":", 1)[1]

    async def _allow_tenant(self, request: Request, tenant: str) -> str:
        """'tenant' or 'admin' when the key may act on ``tenant``: 401 bad key, 403 another tenant's."""
        principal = await self._principal(request)
        if principal is None:
            raise ApiError(401, "invalid API key", "invalid_api_key")
        if principal == "admin":
            return "admin"
        if principal != f"tenant:{tenant}":
            raise ApiError(403, f"this API key does not grant access to tenant {tenant!r}", "permission_denied")
        return "tenant"

    async def _admin(self, request: Request) -> None:
        principal = await self._principal(request)
        if principal is None:
            raise ApiError(401, "invalid API key", "invalid_api_key")
        if principal != "admin":
            raise ApiError(403, "this route needs the admin key", "permission_denied")

    async def _store(self, method: str, *args: Any, **kwargs: Any) -> Any:
        from tenants.errors import TenantError

        try:
            return await asyncio.to_thread(getattr(self.store, method), *args, **kwargs)
        except TenantError as error:
            raise tenant_error(error) from None
