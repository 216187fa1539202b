"""Per-tenant token buckets: the token-rate limit of generation on one ingress replica.

Each tenant has a bucket of ``capacity`` tokens (the per-minute budget) that refills continuously at
``capacity / 60`` tokens per second. A request reserves its worst case at admission
(:meth:`TokenBudget.reserve`) and settles to the usage the engine reports when it ends
(:meth:`TokenBudget.settle`), which refunds what it did not use. Pure bookkeeping with an injectable
clock; not thread-safe: the ingress calls it from its one event loop.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable


@dataclass
class _Bucket:
    level: float  # tokens available at ``at``
    at: float  # clock reading of the last update


class TokenBudget:
    """Token buckets of every tenant seen on this replica (a tenant not seen yet has a full one)."""

    def __init__(self, tokens_per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        if tokens_per_minute < 1:
            raise ValueError(f"tokens_per_minute must be >= 1, got {tokens_per_minute}")
        self.capacity = tokens_per_minute
        self.rate = tokens_per_minute / 60.0  # tokens per second
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def available(self, tenant: str) -> float:
        """Tokens the tenant may reserve now."""
        return self._refilled(tenant).level

    def reserve(self, tenant: str, tokens: int) -> float:
        """Take ``tokens`` from the tenant's bucket: 0.0 when taken, else the seconds until the bucket
        holds them (nothing taken); ``math.inf`` when they exceed the capacity (they never fit)."""
        if tokens > self.capacity:
            return math.inf
        bucket = self._refilled(tenant)
        if bucket.level < tokens:
            return (tokens - bucket.level) / self.rate
        bucket.level -= tokens
        return 0.0

    def settle(self, tenant: str, reserved: int, used: int) -> None:
        """A request that reserved ``reserved`` tokens used ``used``: refund the difference, or charge
        the excess (an estimate that fell short) down to an empty bucket, never below."""
        bucket = self._refilled(tenant)
        bucket.level = min(float(self.capacity), max(0.0, bucket.level + reserved - used))

    def reset_s(self, tenant: str) -> float:
        """Seconds until the tenant's bucket is full again (OpenAI's ``x-ratelimit-reset-tokens``)."""
        return (self.capacity - self._refilled(tenant).level) / self.rate

    def _refilled(self, tenant: str) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = self._buckets[tenant] = _Bucket(float(self.capacity), now)
        # max(): a clock that steps back must not drain the bucket
        bucket.level = min(float(self.capacity), bucket.level + max(0.0, now - bucket.at) * self.rate)
        bucket.at = now
        return bucket


def duration(seconds: float) -> str:
    """``seconds`` the way OpenAI's rate-limit headers write a duration: ``20ms``, ``1.5s``, ``6m0s``."""
    millis = math.ceil(max(0.0, seconds) * 1000)
    if millis < 1000:
        return f"{millis}ms"
    minutes, rest = divmod(millis, 60_000)
    return f"{minutes}m{rest / 1000:g}s" if minutes else f"{rest / 1000:g}s"
