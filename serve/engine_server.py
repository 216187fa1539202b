"""The engine deployment: one vLLM engine per replica, the tenants' adapters, live switching.

The ingress calls :meth:`EngineServer.generate` through a streaming handle with the tenant as Serve's
multiplexed model id (:mod:`serve.routing`). Each replica keeps an
:class:`~serve.adapters.AdapterRegistry` (lazy loads, leases, switch and drop), reports to Serve the
tenants the registry holds (so the router prefers this replica for them), polls HEAD in the
background, and long-polls the adapter board so a publish reaches it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from dataclasses import asdict
from typing import Any, AsyncIterator

from ray import serve as ray_serve

from serve import routing
from serve.adapters import AdapterRegistry, ReplicaCache, StoreAdapterSource
from serve.board import ALL
from serve.config import ServeConfig
from serve.engine import Engine, SamplingOptions, VLLMEngine
from serve.errors import AdapterLoadError, EngineError, EngineInputError, NoAdapterError, ServeError

logger = logging.getLogger(__name__)


def error_item(status: int, message: str, code: str) -> dict[str, Any]:
    return {"error": {"status": status, "message": message, "code": code}}


class EngineServer:
    """Serve deployment class (wrapped by ``serve.deployment`` in :mod:`serve.app`)."""

    async def __init__(self, config: ServeConfig, board=None, engine: Engine | None = None) -> None:
        from tenants.store import TenantStore

        self.config = config
        context = _replica_context()
        self.replica = context.replica_id.unique_id if context else f"local-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        # report held tenants to Serve's router (only inside a Serve replica: Ray's wrapper needs its context)
        self.reports_tenants = context is not None
        self._templates: dict[str, str | None] = {}
        settings = config.store_settings()
        self.store = TenantStore(settings)
        # adapters go to a cache of this replica alone: deleting a superseded version here can never
        # pull files from under another replica that still serves it; the caches of replicas that
        # are gone (crashed, scaled down) are swept now, ours when we stop
        self.cache = ReplicaCache(config.adapter_dir, self.replica)
        self.adapter_dir = self.cache.open()
        adapter_store = TenantStore(settings.model_copy(update={"cache_dir": self.adapter_dir}))
        if engine is None:
            model_path = await asyncio.to_thread(self.store.resolve_base_model, config.engine.model)
            engine = VLLMEngine.start(str(model_path), config.engine)
        self.engine = engine
        self.registry = AdapterRegistry(engine, StoreAdapterSource(adapter_store),
                                        refresh_interval_s=config.refresh_interval_s,
                                        idle_forget_s=config.adapter_idle_s, replica=self.replica,
                                        on_forget=self._withdraw)
        self.registry.start()
        self._board = board
        self._watcher = asyncio.get_running_loop().create_task(self._watch_board()) if board is not None else None
        logger.info("engine replica %s ready (model %s, adapters in %s)", self.replica, config.engine.model,
                    self.adapter_dir)

    # -- requests -----------------------------------------------------------------------------

    async def generate(self, job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream items for one request: ``{"adapter": name}`` first, then ``{"chunk": GenerationChunk}``
        ...; or a single ``{"error": {"status", "message", "code"}}`` for errors a client can act on."""
        tenant, request_id = job["tenant"], job["request_id"]
        try:
            # reported before the load, as Serve does for a model it is loading: requests for the tenant that
            # arrive meanwhile come here rather than load it on another replica too
            await self._report(tenant)
            async with self.registry.lease(tenant) as adapter:
                await self._report(tenant)  # again, under the lease: in case the registry forgot it meanwhile
                yield {"adapter": adapter.name, "replica": self.replica}
                prompt = job.get("prompt")
                if job.get("messages") is not None:
                    prompt = await self.engine.render_chat(job["messages"], await self._chat_template(tenant))
                options = SamplingOptions(**job["options"])
                async for chunk in self.engine.generate(prompt, options, request_id, adapter):
                    yield {"chunk": asdict(chunk)}
        except NoAdapterError as error:
            self._withdraw_unless_held(tenant)
            yield error_item(404, str(error), "model_not_ready")
        except EngineInputError as error:
            yield error_item(400, str(error), "invalid_prompt")
        except AdapterLoadError as error:
            self._withdraw_unless_held(tenant)
            logger.error("request_id=%s tenant=%s adapter load failed: %s", request_id, tenant, error)
            yield error_item(503, f"the adapter of model {tenant!r} could not be loaded; retry later", "adapter_unavailable")
        except (EngineError, ServeError) as error:
            logger.error("request_id=%s tenant=%s engine error: %s", request_id, tenant, error)
            yield error_item(500, "the inference engine failed this request", "engine_error")

    # -- tenant affinity (serve.routing) --------------------------------------------------------

    async def _report(self, tenant: str) -> None:
        """Report the tenant to Serve as held here (a dict lookup once it is)."""
        if self.reports_tenants:
            await self._held(tenant)

    @ray_serve.multiplexed(max_num_models_per_replica=-1)  # never evicted by Ray: the registry decides
    async def _held(self, tenant: str) -> str:
        """Serve's "model" for a tenant: just its name (the registry holds the adapter)."""
        return tenant

    def _withdraw(self, tenant: str) -> None:
        """The registry let the tenant go: stop reporting it (``AdapterRegistry.on_forget``)."""
        routing.withdraw(self, tenant)

    def _withdraw_unless_held(self, tenant: str) -> None:
        """A request reported the tenant but its adapter could not be had: withdraw the report, unless the
        registry holds the tenant after all (another request loaded it)."""
        if self.registry.current_version(tenant) is None:
            routing.withdraw(self, tenant)

    async def _chat_template(self, tenant: str) -> str | None:
        """The tenant's own chat template, if its recipe names one (None: the base's), read once per
        replica: a recipe's rendering is fixed for the tenant's life, like its base model."""
        if tenant not in self._templates:
            config = await asyncio.to_thread(self.store.get_tenant, tenant)
            self._templates[tenant] = config.training.chat_template
        return self._templates[tenant]

    # -- adapters -----------------------------------------------------------------------------

    async def refresh(self, tenant: str, wait_dropped: bool = True) -> dict[str, Any]:
        """Re-read a tenant's HEAD on this replica and switch if it moved (see AdapterRegistry.refresh)."""
        event = await self.registry.refresh(tenant, wait_dropped=wait_dropped, timeout=self.config.switch_timeout_s)
        return event.to_dict()

    async def inspect(self) -> dict[str, Any]:
        """What this replica holds: registry state, the engine's LoRA ids, adapter files on disk."""
        # the store's cache layout: <adapter_dir>/<store id>/tenants/<t>/adapters/<version>
        files = sorted("/".join(p.parts[-4:]) for p in self.adapter_dir.glob("*/tenants/*/adapters/*"))
        return {**self.registry.snapshot(), "engine_lora_ids": sorted(await self.engine.list_adapters()),
                "adapter_dir": str(self.adapter_dir), "adapter_files": files}

    async def check_health(self) -> None:
        await self.engine.check_health()  # raises when vLLM died: Serve restarts this replica
        if self._watcher is not None and self._watcher.done() and not self._watcher.cancelled():
            logger.warning("board watcher of replica %s stopped: %s", self.replica, self._watcher.exception())
            self._watcher = asyncio.get_running_loop().create_task(self._watch_board())

    async def _watch_board(self) -> None:
        """Long-poll the board; refresh the tenants it names and report each switch back."""
        epoch = -1
        while True:
            try:
                epoch, tenants = await self._board.watch.remote(self.replica, epoch)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                logger.warning("replica %s: adapter board unreachable (%s); HEAD polling continues", self.replica, error)
                await asyncio.sleep(2.0)
                continue
            if ALL in tenants:
                tenants = list(self.registry.snapshot()["current"])
            for tenant in tenants:
                asyncio.get_running_loop().create_task(self._refresh_and_report(tenant))

    async def _refresh_and_report(self, tenant: str) -> None:
        try:
            event = await self.registry.refresh(tenant, wait_dropped=True, timeout=self.config.switch_timeout_s)
            await self._board.report.remote(self.replica, event.to_dict())
        except Exception as error:
            logger.warning("tenant %s: refresh on replica %s failed: %s", tenant, self.replica, error)

    async def __del__(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self._board is not None:  # the board may be shutting down too: do not wait for it
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._board.leave.remote(self.replica), 1.0)
        with contextlib.suppress(Exception):
            await self.registry.stop()
        with contextlib.suppress(Exception):
            await self.engine.shutdown()
        with contextlib.suppress(Exception):
            self.cache.close()  # this replica's adapter files (pre-erasure weights among them)


def _replica_context():
    """Serve's context of this replica, or None outside Serve (tests constructing the server directly)."""
    try:
        return ray_serve.get_replica_context()
    except Exception:  # outside Serve
        return None
