"""The Serve application builder: ``serve run serve.app:build_app`` (or ``serve deploy serve/serve_config.yaml``).

Three deployments:

- ``Ingress`` (FastAPI): authentication, OpenAI/erasure/admin routes, the erasure backend; light,
  scaled by ``ingress_replicas``.
- ``EngineServer``: one vLLM engine per replica with the current adapter of each tenant sent to it
  (a tenant's requests go to a replica that holds its adapter while it has room: ``serve.routing``);
  scaled by ``engine_replicas`` or ``autoscaling``. Kept apart from the ingress so that HTTP work (auth with
  scrypt, S3 calls, JSON) never competes with the engine's event loop, and so the two scale
  independently; the price is one more hop per request (a local actor call, ~1 ms).
- ``AdapterBoard``: the switch board that tells every engine replica a HEAD moved and collects
  when each one switched (``serve.board``).
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve
from ray.serve import Application

from serve.board import BOARD_DEPLOYMENT, AdapterBoard
from serve.config import ServeConfig
from serve.engine_server import EngineServer
from serve.errors import ServeConfigError
from serve.ingress import Ingress, app

logger = logging.getLogger(__name__)

ENGINE_DEPLOYMENT = "EngineServer"
INGRESS_DEPLOYMENT = "Ingress"


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The application for ``args`` (ServeConfig fields; ERASER_SERVE_* fills the rest)."""
    config = args if isinstance(args, ServeConfig) else ServeConfig.from_args(args)
    if not config.engine.model:
        raise ServeConfigError("engine.model is required: a local HF model directory or a model name in the store "
                               "(ERASER_SERVE_ENGINE__MODEL)")
    logger.info("serve config: %s", config.model_dump(mode="json", exclude={"store"}))

    board = serve.deployment(
        AdapterBoard, name=BOARD_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=100_000,  # every engine replica keeps a long-poll open here
    ).bind()

    scaling: dict[str, Any]
    if config.autoscaling is not None:
        scaling = {"autoscaling_config": config.autoscaling.model_dump()}
    else:
        scaling = {"num_replicas": config.engine_replicas}
    engine = serve.deployment(
        EngineServer, name=ENGINE_DEPLOYMENT, ray_actor_options={"num_cpus": config.engine_num_cpus},
        max_ongoing_requests=config.max_ongoing_requests, health_check_period_s=10,
        graceful_shutdown_timeout_s=30, **scaling,
    ).bind(config, board)

    ingress = serve.deployment(
        serve.ingress(app)(Ingress), name=INGRESS_DEPLOYMENT, num_replicas=config.ingress_replicas,
        ray_actor_options={"num_cpus": config.ingress_num_cpus}, max_ongoing_requests=1000,
    )
    return ingress.bind(config, engine, board)
