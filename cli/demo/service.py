"""Step 2: train each tenant's adapter through the cluster layer (a job on the Ray cluster) and start the
service (Ray Serve + vLLM) on them.

Checked, not assumed: every tenant's HEAD points at the adapter version its onboarding returned and that
version is in the store, and ``/v1/models`` with the tenant's own key lists the tenant's model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from cli.demo.clients import wait_ready
from cli.demo.config import APP_NAME, BASE_MODEL_NAME, DemoConfig
from cli.demo.report import DemoReport, say, stage
from cli.demo.world import World
from cli.store_args import serve_store_args


@dataclass
class Service:
    """The running service: its URL and an OpenAI client per tenant (with the tenant's key)."""

    base_url: str
    clients: dict[str, Any]


def start_service(config: DemoConfig, settings, store, world: World, report: DemoReport) -> Service:
    import openai
    from ray import serve

    from cluster.service import RayErasureService
    from serve.app import build_app
    from serve.config import ServeConfig

    service = RayErasureService(settings)
    with stage("2. train each tenant's adapter (a job on the Ray cluster) and start the service"):
        train_times, versions = {}, {}
        for tenant in config.tenants:
            started = time.perf_counter()
            versions[tenant] = service.onboard(tenant)
            train_times[tenant] = time.perf_counter() - started
            say(f"   tenant {tenant}: adapter {versions[tenant]} trained and published in {train_times[tenant]:.1f}s")
        serve_config = ServeConfig.from_args({
            "app_name": APP_NAME,
            "engine": {"model": BASE_MODEL_NAME, "max_loras": 4, "max_cpu_loras": 8, "max_lora_rank": 16,
                       "kv_cache_space_gib": 1},
            "store": serve_store_args(settings),
            "erasure_backend": "serve.backend:cluster_backend",
            "refresh_interval_s": 2.0,
            "adapter_dir": str(config.workdir / "replica-adapters"),
        })
        serve.start(http_options={"host": "127.0.0.1", "port": config.port})
        serve.run(build_app(serve_config), name=APP_NAME, route_prefix="/", blocking=False)
        base_url = f"http://127.0.0.1:{config.port}"
        wait_ready(base_url)
        clients = {t: openai.OpenAI(base_url=f"{base_url}/v1", api_key=world.keys[t], timeout=120, max_retries=0)
                   for t in config.tenants}
        running = Service(base_url, clients)
        problems = check_service(store, running, versions)
        report.add("adapters trained and service started", not problems, train_s=train_times, url=base_url,
                   adapters=versions, problems=problems)
    return running


def check_service(store, service: Service, versions: dict[str, str]) -> list[str]:
    """What is wrong with the onboarded tenants as the store and the API show them (nothing: ``[]``)."""
    problems = []
    for tenant, version in versions.items():
        head, _ = store.get_head(tenant)
        if head is None or head.adapter != version:
            problems.append(f"tenant {tenant}: HEAD is {head.adapter if head else None}, onboarding published {version}")
        elif version not in store.list_adapter_versions(tenant):
            problems.append(f"tenant {tenant}: HEAD's adapter {version} is not in the store")
        listed = [model.id for model in service.clients[tenant].models.list().data]
        if tenant not in listed:
            problems.append(f"tenant {tenant}: /v1/models lists {listed}")
    return problems
