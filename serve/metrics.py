"""The serving layer's Ray metrics (Prometheus format, through :func:`cluster.metrics.emit`: no-ops outside Ray).

Per tenant: requests and their latency, tokens, generations running on this ingress replica, refusals by a
limit; adapter loads, evictions and switches. The erasure coordinator's own are in ``cluster.metrics``.
"""

from __future__ import annotations

from cluster.metrics import emit as _emit


def request_done(tenant: str, route: str, status: int, seconds: float) -> None:
    tags = {"tenant": tenant, "route": route, "status": str(status)}
    _emit("counter", "eraser_requests_total", "OpenAI-route requests per tenant, route and status", 1, tags)
    _emit("histogram", "eraser_request_seconds", "OpenAI-route request latency", seconds, tags)


def tokens_used(tenant: str, prompt_tokens: int, completion_tokens: int) -> None:
    """A generation's usage, as the engine reported it."""
    for kind, count in (("prompt", prompt_tokens), ("completion", completion_tokens)):
        _emit("counter", "eraser_tokens_total", "tokens per tenant and kind (prompt, completion)", count,
              {"tenant": tenant, "kind": kind})


def running(tenant: str, count: int) -> None:
    """Generations of ``tenant`` admitted on this ingress replica and not finished (queued in an engine
    or generating): the tenant's queue depth here, bounded by ``max_concurrent_per_tenant``."""
    _emit("gauge", "eraser_tenant_generations_running", "generations admitted and not finished, per tenant",
          count, {"tenant": tenant})


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
