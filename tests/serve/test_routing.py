"""Tenant affinity (serve.routing): the ingress names the tenant as Serve's multiplexed model id, and an
engine replica reports to Serve exactly the tenants its registry holds, through Ray's own multiplex
wrapper (Ray's code runs here; only the replica context and the controller client are stand-ins).
The routing itself, against two real replicas: tests/serve/test_two_replicas.py."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace
from unittest import mock

from serve import routing
from serve.engine_server import EngineServer
from tests.serve.local_ingress import LocalService
from tests.serve.test_engine_server import start_replica
from tests.serve.fakes import FakeEngine
from tests.tenants.helpers import onboard


@contextlib.contextmanager
def in_a_replica():
    """Ray's multiplex wrapper as in a replica: its context, and a controller client that records what the
    replica pushes (the list of reported ids, each push)."""
    import ray.serve.multiplex as multiplex

    pushed: list[set[str]] = []
    client = SimpleNamespace(record_request_routing_info=lambda info: pushed.append(set(info.multiplexed_model_ids)))
    context = SimpleNamespace(app_name="app", deployment="EngineServer", replica_id="replica-1")
    with mock.patch.object(multiplex, "_get_internal_replica_context", return_value=context), \
            mock.patch.object(multiplex, "_get_global_client", return_value=client):
        yield pushed


async def settle() -> None:
    """Past the wrapper's push interval (PUSH_MULTIPLEXED_MODEL_IDS_INTERVAL_S, 0.1 s)."""
    from ray.serve._private.constants import PUSH_MULTIPLEXED_MODEL_IDS_INTERVAL_S

    await asyncio.sleep(PUSH_MULTIPLEXED_MODEL_IDS_INTERVAL_S * 4)


def test_withdraw_works_on_the_installed_rays_multiplex_wrapper():
    """The private Ray API that routing.withdraw relies on (see its docstring): if Ray changes where the
    wrapper lives, its ``models`` or its push flag, this fails."""
    from ray import serve

    class Owner:
        @serve.multiplexed(max_num_models_per_replica=-1)
        async def held(self, tenant: str) -> str:
            return tenant

    async def main():
        owner = Owner()
        with in_a_replica() as pushed:
            assert not routing.withdraw(owner, "acme")  # nothing reported yet
            assert await owner.held("acme") == "acme" and await owner.held("beta") == "beta"
            await settle()
            assert pushed[-1] == {"acme", "beta"}
            wrapper = getattr(owner, routing.MULTIPLEX_WRAPPER_ATTR)
            assert type(wrapper).__name__ == "_ModelMultiplexWrapper" and list(wrapper.models) == ["acme", "beta"]
            assert wrapper.max_num_models_per_replica == -1
            assert routing.withdraw(owner, "acme")
            assert not routing.withdraw(owner, "acme")
            await settle()
            assert pushed[-1] == {"beta"}  # pushed to the controller without a new load
            assert await owner.held("acme") == "acme"  # and reported again on its next use
            await settle()
            assert pushed[-1] == {"acme", "beta"}
            wrapper.metrics_pusher.stop_event.set()

    asyncio.run(main())


def test_a_replica_reports_exactly_the_tenants_its_registry_holds(store, tmp_path):
    onboard(store, tmp_path, "acme")
    from tenants.models import TenantConfig

    store.create_tenant(TenantConfig(name="ghost", base_model="tiny-llama"))  # no adapter published

    def job(tenant: str) -> dict:
        return {"tenant": tenant, "request_id": f"req-{tenant}", "prompt": "hi", "options": {"max_tokens": 1}}

    async def main():
        with in_a_replica() as pushed:
            server: EngineServer = await start_replica(store, tmp_path, FakeEngine())
            assert not server.reports_tenants  # not in a replica when it started (the test's own loop)
            server.reports_tenants = True
            try:
                items = [item async for item in server.generate(job("acme"))]
                assert "error" not in items[-1], items
                await settle()
                assert pushed[-1] == {"acme"}
                items = [item async for item in server.generate(job("ghost"))]
                assert items[0]["error"]["status"] == 404
                await settle()
                assert pushed[-1] == {"acme"}  # reported while it tried, withdrawn: nothing to route to
                assert server.registry.current_version("acme") is not None

                server.registry.idle_forget_s = 0.0
                assert await server.registry.forget_idle() == ["acme"]
                await settle()
                assert pushed[-1] == set()  # the registry forgot it: Serve is told
                items = [item async for item in server.generate(job("acme"))]
                assert "error" not in items[-1], items
                await settle()
                assert pushed[-1] == {"acme"}
            finally:
                getattr(server, routing.MULTIPLEX_WRAPPER_ATTR).metrics_pusher.stop_event.set()
                await server.__del__()

    asyncio.run(main())


def test_the_ingress_sends_each_generation_with_its_tenant_as_the_multiplexed_model_id(store, tmp_path):
    onboard(store, tmp_path, "acme")
    key = store.issue_key("acme")

    async def main():
        service = await LocalService(store, tmp_path).start()
        try:
            for stream in (False, True):
                response = await service.http.post(
                    "/v1/completions", headers={"authorization": f"Bearer {key}"},
                    json={"model": "acme", "prompt": "hi", "max_tokens": 2, "stream": stream})
                assert response.status_code == 200, response.text
            response = await service.http.post(
                "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                json={"model": "acme", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert response.status_code == 200, response.text
            assert service.ingresses[0].engine.options_used == [{"multiplexed_model_id": "acme", "stream": True}] * 3
        finally:
            await service.close()

    asyncio.run(main())
