"""Ray metrics of the service (exported by Ray's metrics agent, Prometheus format).

Created lazily and only inside a Ray worker; elsewhere (unit tests, scripts) every call is a no-op.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

logger = logging.getLogger(__name__)

_SECONDS_BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600]


@lru_cache(maxsize=None)
def _metric(kind: str, name: str, description: str, tag_keys: tuple[str, ...]) -> Any:
    try:
        import ray
        from ray.util import metrics

        if not ray.is_initialized():
            return None
        if kind == "counter":
            return metrics.Counter(name, description=description, tag_keys=tag_keys)
        if kind == "gauge":
            return metrics.Gauge(name, description=description, tag_keys=tag_keys)
        return metrics.Histogram(name, description=description, boundaries=_SECONDS_BOUNDARIES, tag_keys=tag_keys)
    except Exception as error:  # metrics must never break serving
        logger.debug("metric %s unavailable: %s", name, error)
        return None


def _emit(kind: str, name: str, description: str, value: float, tags: dict[str, str]) -> None:
    metric = _metric(kind, name, description, tuple(sorted(tags)))
    if metric is None:
        return
    try:
        if kind == "counter":
            metric.inc(value, tags=tags)
        elif kind == "gauge":
            metric.set(value, tags=tags)
        else:
            metric.observe(value, tags=tags)
    except Exception as error:
        logger.debug("metric %s not recorded: %s", name, error)


def request_done(tenant: str, route: str, status: int, seconds: float) -> None:
    tags = {"tenant": tenant, "route": route, "status": str(status)}
    _emit("counter", "eraser_requests_total", "OpenAI-route requests per tenant, route and status", 1, tags)
    _emit("histogram", "eraser_request_seconds", "OpenAI-route request latency", seconds, tags)


def rate_limited(tenant: str, limit: str) -> None:
    """A generation refused by a per-tenant limit (``limit``: "tokens" or "concurrency")."""
    _emit("counter", "eraser_rate_limited_total", "generations refused by a per-tenant limit (429)", 1,
          {"tenant": tenant, "limit": limit})


def adapter_loaded(tenant: str, seconds: float) -> None:
    _emit("counter", "eraser_adapter_loads_total", "adapter versions loaded into an engine", 1, {"tenant": tenant})
    _emit("histogram", "eraser_adapter_load_seconds", "download + engine load of one adapter version", seconds,
          {"tenant": tenant})


def adapter_dropped(tenant: str, seconds_after_retired: float) -> None:
    _emit("counter", "eraser_adapter_evictions_total", "superseded adapter versions removed from an engine", 1,
          {"tenant": tenant})
    _emit("histogram", "eraser_adapter_drain_seconds", "retired to removed (in-flight requests finishing)",
          seconds_after_retired, {"tenant": tenant})


def adapter_switched(tenant: str, seconds: float) -> None:
    _emit("histogram", "eraser_adapter_switch_seconds", "refresh start to the new version serving", seconds,
          {"tenant": tenant})
