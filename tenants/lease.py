"""A per-tenant coordinator lease in S3: one writer of a tenant's HEAD and receipts at a time.

``tenants/<t>/LEASE.json`` names the holder, a fencing token and an expiry. It is only ever written by
compare-and-swap (``IfNoneMatch`` to create, ``IfMatch`` to renew, take over or release), so two
coordinators can never both believe they hold it. The holder renews it in a background thread
(every ``ttl_s / 3``); a coordinator that dies stops renewing and the lease expires ``ttl_s`` later,
when another may take it over. Taking over increments the token; the holder stamps its token on
every HEAD move and receipt change, and a writer whose token is lower than what it finds there has
been fenced off (:class:`tenants.errors.LeaseLostError`). Releasing keeps the object (and its
token) and marks it expired, so tokens only grow.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

from pydantic import Field

from tenants.errors import LeaseHeldError, LeaseLostError, StoreError
from tenants.models.base import _Model, utcnow
from tenants.s3io import PreconditionLost

logger = logging.getLogger(__name__)


class LeaseRecord(_Model):
    """``LEASE.json``: who coordinates a tenant, under which fencing token, until when."""

    tenant: str = Field(description="the tenant coordinated")
    holder: str = Field(description="the coordinator holding it: host:pid:random")
    token: int = Field(ge=1, description="fencing token: grows by one at every change of holder")
    acquired_at: datetime = Field(description="when this holder took it")
    expires_at: datetime = Field(description="when it lapses unless renewed (UTC)")
    released: bool = Field(False, description="the holder gave it up (free before expires_at)")


def new_holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class TenantLease:
    """The lease of one tenant for one holder. ``acquire`` waits up to ``wait_s`` for another holder's
    lease to lapse, then raises LeaseHeldError; ``check`` proves (by a compare-and-swap renewal) that
    it is still held, else raises LeaseLostError; ``release`` gives it up."""

    def __init__(self, store: Any, tenant: str, holder: str | None = None, ttl_s: float = 30.0,
                 wait_s: float = 0.0, poll_s: float = 0.5) -> None:
        if ttl_s <= 0:
            raise ValueError(f"lease ttl_s must be > 0, got {ttl_s!r}")
        self.store, self.tenant = store, tenant
        self.holder = holder or new_holder()
        self.ttl_s, self.wait_s, self.poll_s = ttl_s, wait_s, poll_s
        self.key = store.layout.lease(tenant)
        self.token: int | None = None
        self.lost: str | None = None  # why the lease was lost, once it was
        self._etag: str | None = None
        self._record: LeaseRecord | None = None
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self.token is not None and self.lost is None

    # ------------------------------------------------------------ acquire / renew / release
    def acquire(self) -> int:
        """Take the lease (waiting up to ``wait_s``); returns the fencing token. Starts the renewals."""
        deadline = time.monotonic() + self.wait_s
        while True:
            found = self.store.io.get_model(self.key, LeaseRecord)
            now = utcnow()
            current, etag = found if found is not None else (None, None)
            if current is None or current.released or current.expires_at <= now:
                token = (current.token + 1) if current is not None else 1
                record = LeaseRecord(tenant=self.tenant, holder=self.holder, token=token, acquired_at=now,
                                     expires_at=now + timedelta(seconds=self.ttl_s))
                try:
                    self._etag = self.store.io.put_model(self.key, record, **(
                        {"if_match": etag} if etag is not None else {"if_none_match": True}))
                except PreconditionLost:
                    continue  # another coordinator moved first: look again
                with self._guard:
                    self.token, self._record, self.lost = token, record, None
                if current is not None and not current.released:
                    logger.warning("tenant %s: took over the coordinator lease of %s (expired %s), token %d",
                                   self.tenant, current.holder, current.expires_at.isoformat(), token)
                else:
                    logger.info("tenant %s: coordinator lease acquired by %s, token %d", self.tenant, self.holder, token)
                self._start_renewals()
                return token
            if time.monotonic() >= deadline:
                raise LeaseHeldError(
                    f"tenant {self.tenant!r} is being coordinated by {current.holder} (lease token {current.token}, "
                    f"until {current.expires_at.isoformat()}): its work is not taken over while that lease is "
                    f"renewed; try again later")
            time.sleep(min(self.poll_s, max(0.0, deadline - time.monotonic())) or self.poll_s)

    def renew(self) -> None:
        """Extend the expiry by compare-and-swap. LeaseLostError when another holder took it over."""
        with self._guard:
            if self.token is None:
                raise LeaseLostError(f"tenant {self.tenant!r}: the coordinator lease is not held")
            if self.lost is not None:
                raise LeaseLostError(self.lost)
            record = self._record.model_copy(update={"expires_at": utcnow() + timedelta(seconds=self.ttl_s)})
            try:
                self._etag = self.store.io.put_model(self.key, record, if_match=self._etag)
            except PreconditionLost:
                self.lost = (f"tenant {self.tenant!r}: the coordinator lease of {self.holder} (token {self.token}) "
                             "lapsed and was taken over by another coordinator")
                logger.error("%s", self.lost)
                raise LeaseLostError(self.lost) from None
            self._record = record

    def check(self) -> int:
        """Prove the lease is still held right now (a renewal); returns the token. Call before a commit."""
        self.renew()
        assert self.token is not None
        return self.token

    def release(self) -> None:
        """Stop renewing and give the lease up (best effort: an unreleased lease simply expires)."""
        self._stop.set()
        if self._renewer is not None and self._renewer is not threading.current_thread():
            self._renewer.join(timeout=5)
        self._renewer = None
        with self._guard:
            if self.token is not None and self.lost is None and self._record is not None:
                record = self._record.model_copy(update={"released": True, "expires_at": utcnow()})
                try:
                    self.store.io.put_model(self.key, record, if_match=self._etag)
                except (PreconditionLost, StoreError) as error:
                    logger.warning("tenant %s: could not release the coordinator lease (%s); it expires by itself",
                                   self.tenant, error)
            self.token, self._record, self._etag = None, None, None

    # ------------------------------------------------------------ the renewal thread
    def _start_renewals(self) -> None:
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew_loop, args=(self._stop,), daemon=True,
                                         name=f"lease-{self.tenant}")
        self._renewer.start()

    def _renew_loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except LeaseLostError:
                return
            except Exception as error:  # noqa: BLE001 (S3 unreachable: the next renewal tries again)
                logger.warning("tenant %s: renewing the coordinator lease failed (retried): %s", self.tenant, error)

    def pause_renewals(self) -> None:
        """Stop the renewal thread without releasing (tests: a coordinator that hangs or is partitioned)."""
        self._stop.set()

    def __enter__(self) -> "TenantLease":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
