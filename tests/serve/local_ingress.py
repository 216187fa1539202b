"""The real ingress (its FastAPI routes, auth, store calls) in this process, without Ray Serve: the
routes bound to an ``Ingress`` instance and served through httpx's ASGI transport, the engine a real
``EngineServer`` over ``FakeEngine`` and the board a real ``AdapterBoard``, both behind local handles
that behave like Serve's (``.remote()`` awaitable, ``options(stream=True)`` async-iterable)."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.routing import APIRoute

from serve.board import AdapterBoard
from serve.config import ServeConfig
from serve.engine_server import EngineServer
from serve.ingress import Ingress, app
from tests.serve.fakes import FakeEngine


class _Stream:
    def __init__(self, generator) -> None:
        self._generator = generator

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self._generator.__anext__()

    def cancel(self) -> None:
        asyncio.ensure_future(self._generator.aclose())


class _Method:
    def __init__(self, target: Any, name: str) -> None:
        self._call = getattr(target, name)

    def remote(self, *args: Any, **kwargs: Any):
        if inspect.isasyncgenfunction(self._call):
            return _Stream(self._call(*args, **kwargs))
        return asyncio.ensure_future(self._call(*args, **kwargs))


class LocalHandle:
    """A Serve deployment handle over a local object (same event loop)."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.options_used: list[dict[str, Any]] = []  # every options() call's arguments, in order

    def options(self, **options: Any) -> LocalHandle:
        self.options_used.append(options)
        return self

    def __getattr__(self, name: str) -> _Method:
        return _Method(self.target, name)


def bind(instance: Ingress) -> FastAPI:
    """The ingress's routes with ``self`` bound, as ``serve.ingress`` does, and its error handlers."""
    bound = FastAPI()
    for route in app.routes:
        if isinstance(route, APIRoute):
            bound.add_api_route(route.path, route.endpoint.__get__(instance), methods=list(route.methods))
    bound.exception_handlers.update(app.exception_handlers)
    return bound


def serve_config(store, tmp_path, **fields: Any) -> ServeConfig:
    settings = store.settings
    return ServeConfig.from_args({"store": {"endpoint": settings.endpoint, "bucket": settings.bucket,
                                            "prefix": settings.prefix, "access_key": settings.access_key,
                                            "secret_key": settings.secret_key.get_secret_value()},
                                  "adapter_dir": str(tmp_path / "replicas"), "refresh_interval_s": 0, **fields})


class LocalService:
    """Ingress replicas sharing one engine replica and one board (build inside a running loop)."""

    def __init__(self, store, tmp_path, replicas: int = 1, **fields: Any) -> None:
        self.config = serve_config(store, tmp_path, **fields)
        self.engine_fake = FakeEngine()
        self.board = AdapterBoard()
        self.ingresses: list[Ingress] = []
        self.clients: list[httpx.AsyncClient] = []
        self._replicas = replicas

    async def start(self) -> LocalService:
        server = EngineServer.__new__(EngineServer)
        await server.__init__(self.config, board=None, engine=self.engine_fake)
        self.engine = server
        for _ in range(self._replicas):
            ingress = Ingress(self.config, LocalHandle(server), LocalHandle(self.board))
            self.ingresses.append(ingress)
            self.client(len(self.ingresses) - 1)
        return self

    def client(self, replica: int = 0, host: str = "203.0.113.7") -> httpx.AsyncClient:
        """An HTTP client of ingress replica ``replica``, calling from address ``host``."""
        transport = httpx.ASGITransport(app=bind(self.ingresses[replica]), raise_app_exceptions=False,
                                        client=(host, 50000))
        client = httpx.AsyncClient(transport=transport, base_url="http://ingress")
        self.clients.append(client)
        return client

    async def close(self) -> None:
        for client in self.clients:
            await client.aclose()
        for ingress in self.ingresses:
            ingress.__del__()
        await self.engine.registry.stop()

    @property
    def http(self) -> httpx.AsyncClient:
        """The client of replica 0 (made first)."""
        return self.clients[0]
