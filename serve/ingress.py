"""The HTTP ingress: OpenAI-compatible routes, erasure routes, admin routes (FastAPI on Ray Serve).

Authentication: ``Authorization: Bearer <key>``. A tenant key reaches that tenant's model (its name)
and its erasures only; the admin key reaches the admin routes and every tenant's erasure routes.
Errors always have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

``Ingress`` is assembled here from one class per concept, each in its module:

- :mod:`serve.ingress_auth` (``IngressAuth``): API keys, their caches and revocation, store calls;
- :mod:`serve.openai_routes` (``OpenAIRoutes``): ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``;
- :mod:`serve.tenant_routes` (``TenantRoutes``): ``/v1/tenants/{tenant}`` and its erasures;
- :mod:`serve.admin_routes` (``AdminRoutes``): ``/v1/admin/...``;

with the FastAPI ``app`` and its error handlers in :mod:`serve.http_app`, the error type in
:mod:`serve.api_errors`, and body parsing in :mod:`serve.request_body` and :mod:`serve.import_body`.
``serve.ingress(app)(Ingress)`` (in :mod:`serve.app`) binds the base classes' routes too: Ray Serve
matches a route to the class by the qualnames along its MRO. The names other modules import from
here stay importable from here.
"""

from __future__ import annotations

import logging

from serve.api_errors import ApiError, tenant_error
from serve.backend import BackendContext, load_backend
from serve.board import SwitchNotifier
from serve.config import ServeConfig
from serve.http_app import app
from serve.import_body import ImportBody, parse_import
from serve.ingress_auth import IngressAuth
from serve.request_body import decode_json, parse, read_body, read_json

# The route modules, imported in the order their routes are registered on ``app`` (as in /openapi.json).
from serve.openai_routes import OpenAIRoutes  # noqa: E402, I001
from serve.tenant_routes import TenantRoutes  # noqa: E402
from serve.admin_routes import AdminRoutes  # noqa: E402

__all__ = ["ApiError", "ImportBody", "Ingress", "app", "decode_json", "parse", "parse_import", "read_body",
           "read_json", "tenant_error"]

logger = logging.getLogger(__name__)


class Ingress(IngressAuth, OpenAIRoutes, TenantRoutes, AdminRoutes):
    """Serve ingress deployment class (``serve.ingress(app)`` is applied in :mod:`serve.app`)."""

    def __init__(self, config: ServeConfig, engine, board) -> None:
        from tenants.store import TenantStore

        self.config = config
        self.engine = engine
        self.board = board
        settings = config.store_settings()
        self.store = TenantStore(settings)
        self.notifier = SwitchNotifier(config.app_name, timeout_s=config.switch_timeout_s)
        self.backend = load_backend(config.erasure_backend,
                                    BackendContext(store_settings=settings, notify_switch=self.notifier,
                                                   app_name=config.app_name))
        self._init_guards()
        logger.info("ingress ready: store %s, backend %s", settings.describe(), type(self.backend).__name__)

    def __del__(self) -> None:
        """Stop watching key revocations and the backend's background work (its reconciler). Serve calls
        it when the replica shuts down; Python, when the instance is collected. Sync on purpose: Python
        never awaits an ``async def __del__``."""
        self._stop_watching()
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}
