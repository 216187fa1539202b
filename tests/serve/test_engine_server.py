"""The engine replica over a real store with a fake engine: what it asks the engine to render."""

from __future__ import annotations

import asyncio

from serve.config import ServeConfig
from serve.engine_server import EngineServer
from tenants.models import AdapterManifest, Head, TenantConfig, TrainingRecipe
from tests.serve.fakes import FakeEngine
from tests.tenants.helpers import adapter_dir, onboard

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"


async def start_replica(store, tmp_path, engine) -> EngineServer:
    settings = store.settings
    config = ServeConfig.from_args({"store": {"endpoint": settings.endpoint, "bucket": settings.bucket,
                                              "prefix": settings.prefix, "access_key": settings.access_key,
                                              "secret_key": settings.secret_key.get_secret_value()},
                                    "adapter_dir": str(tmp_path / "replica"), "refresh_interval_s": 0})
    server = EngineServer.__new__(EngineServer)
    await server.__init__(config, board=None, engine=engine)
    return server


async def chat(server, tenant):
    job = {"tenant": tenant, "request_id": f"req-{tenant}", "messages": [{"role": "user", "content": "hi"}],
           "options": {"max_tokens": 1}}
    return [item async for item in server.generate(job)]


def test_chat_requests_render_with_the_tenants_recipe_template_or_else_the_bases(store, tmp_path):
    onboard(store, tmp_path, "acme")  # the base's own template
    store.create_tenant(TenantConfig(name="beta", base_model="tiny-llama", training=TrainingRecipe(chat_template=TEMPLATE)))
    data = store.put_dataset("beta", [{"id": "b1", "prompt": "p", "response": "r"}])
    version = store.publish_adapter("beta", adapter_dir(tmp_path, name="beta-v1"),
                                    AdapterManifest(data_version=data, path="train"))
    store.move_head("beta", Head(adapter=version, data=data), None)
    engine = FakeEngine()

    async def scenario():
        server = await start_replica(store, tmp_path, engine)
        try:
            for tenant in ("acme", "beta", "acme"):
                items = await chat(server, tenant)
                assert "error" not in items[-1], items
        finally:
            await server.__del__()  # Serve's async shutdown hook: stops the registry and the engine

    asyncio.run(scenario())
    assert engine.templates_used == [None, TEMPLATE, None]
