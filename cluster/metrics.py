"""Ray metrics (exported by Ray's metrics agent, Prometheus format): the one way this service records
them, and the erasure coordinator's own. ``serve.metrics`` records the serving layer's through :func:`emit`.

Created lazily and only inside a connected Ray process; elsewhere (unit tests, scripts, ``--local`` runs)
every call is a no-op. A metric that cannot be created or recorded never breaks the work it measures.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any, Literal, Mapping

logger = logging.getLogger(__name__)

SECONDS_BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600]

Kind = Literal["counter", "gauge", "histogram"]


@lru_cache(maxsize=None)
def _metric(kind: Kind, name: str, description: str, tag_keys: tuple[str, ...]) -> Any:
    try:
        import ray
        from ray.util import metrics

        if not ray.is_initialized():
            return None
        if kind == "counter":
            return metrics.Counter(name, description=description, tag_keys=tag_keys)
        if kind == "gauge":
            return metrics.Gauge(name, description=description, tag_keys=tag_keys)
        return metrics.Histogram(name, description=description, boundaries=SECONDS_BOUNDARIES, tag_keys=tag_keys)
    except Exception as error:  # metrics must never break serving
        logger.debug("metric %s unavailable: %s", name, error)
        return None


def emit(kind: Kind, name: str, description: str, value: float, tags: dict[str, str]) -> None:
    """Add ``value`` to a counter, set a gauge to it or observe it in a histogram (seconds)."""
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


def erasure_batch(tenant: str, status: str, requests: int, stages: Mapping[str, Any]) -> None:
    """A batch of erasure requests ended (``status``: published or failed): one count per request, and
    each numeric ``<stage>_s`` of its stages (queued, load, influence, verification, remediation, guard,
    publish, notify, total, ...) as ``eraser_erasure_stage_seconds{stage=...}``."""
    emit("counter", "eraser_erasures_total", "erasure requests that ended, by status", requests,
         {"tenant": tenant, "status": status})
    for name, seconds in stages.items():
        if name.endswith("_s") and isinstance(seconds, (int, float)) and not isinstance(seconds, bool):
            emit("histogram", "eraser_erasure_stage_seconds", "seconds an erasure batch spent in each stage",
                 float(seconds), {"tenant": tenant, "stage": name[:-2]})
