"""One served application per test session: real SeaweedFS, real Ray Serve, one real vLLM engine.

``served`` builds a tiny base model and three LoRA adapters (tenant ``acme`` v1 and v2, tenant
``beta`` v1), puts them in the store exactly as the erasure path would (publish + move HEAD), and
runs ``serve.app:build_app`` on a local Ray. Tests that move HEAD restore it afterwards.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.serve import models

TENANTS = {"acme": "alpha", "beta": "bravo"}  # tenant -> tag of its first adapter's records
SWITCH_TAG = "charlie"  # acme's second adapter (what an erasure would publish)


@dataclass
class Served:
    """Handles on the running application and what the tests compare against."""

    base_url: str
    base_dir: Path
    store: object  # tenants.TenantStore on the application's prefix
    admin_key: str
    keys: dict[str, str]  # tenant -> API key
    adapters: dict[str, Path]  # "acme@v1", "acme@v2", "beta@v1" -> local adapter directory
    versions: dict[str, str]  # same keys -> store version (v000001, ...)
    data_versions: dict[str, str] = field(default_factory=dict)  # tenant -> data version
    references: dict[tuple, str] = field(default_factory=dict)  # cache of HF/PEFT greedy answers

    def client(self, tenant: str, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.base_url}/v1", api_key=self.keys[tenant], max_retries=0, **kwargs)

    def reference(self, adapter: str, prompt_ids: list[int], max_tokens: int) -> str:
        key = (adapter, tuple(prompt_ids), max_tokens)
        if key not in self.references:
            self.references[key] = models.hf_greedy(self.base_dir, self.adapters[adapter], prompt_ids, max_tokens)
        return self.references[key]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def serving_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-models")
    base = models.build_base(root / "base", [*TENANTS.values(), SWITCH_TAG])
    adapters = {f"{tenant}@v1": models.train_adapter(base, models.tenant_records(tag), root / f"{tenant}-v1")
                for tenant, tag in TENANTS.items()}
    adapters["acme@v2"] = models.train_adapter(base, models.tenant_records(SWITCH_TAG), root / "acme-v2")
    return base, adapters


@pytest.fixture(scope="session")
def served(serving_models, s3_server, s3_bucket, tmp_path_factory):
    import ray
    from ray import serve

    from serve.app import build_app
    from tenants.keys import ADMIN_KEY_ENV
    from tenants.models import AdapterManifest, Head, TenantConfig
    from tenants.store import TenantStore

    base, adapters = serving_models
    root = tmp_path_factory.mktemp("served")
    prefix = f"serve-{uuid.uuid4().hex[:8]}"
    settings = s3_server.settings(bucket=s3_bucket, prefix=prefix, cache_dir=root / "cache")
    store = TenantStore(settings)
    store.put_model("tiny", base)
    versions, keys, data_versions = {}, {}, {}
    for tenant, tag in TENANTS.items():
        store.create_tenant(TenantConfig(name=tenant, base_model="tiny"))
        keys[tenant] = store.issue_key(tenant, "tests")
        data = store.put_dataset(tenant, [r.__dict__ for r in models.tenant_records(tag)])
        data_versions[tenant] = data
        versions[f"{tenant}@v1"] = store.publish_adapter(tenant, adapters[f"{tenant}@v1"],
                                                         AdapterManifest(data_version=data, path="train"))
        store.move_head(tenant, Head(adapter=versions[f"{tenant}@v1"], data=data), None)
    versions["acme@v2"] = store.publish_adapter("acme", adapters["acme@v2"],
                                                AdapterManifest(data_version=data_versions["acme"], path="retrain"))
    admin_key = os.environ.get(ADMIN_KEY_ENV) or store.ensure_admin_key() or store.rotate_admin_key()

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    store_args = {"endpoint": settings.endpoint, "bucket": settings.bucket, "prefix": settings.prefix,
                  "access_key": settings.access_key, "secret_key": settings.secret_key.get_secret_value(),
                  "region": settings.region, "cache_dir": str(root / "replica-cache")}
    config = {
        "app_name": "eraser-tests",
        "engine": {"model": "tiny", "max_model_len": 256, "max_loras": 2, "max_cpu_loras": 4, "max_lora_rank": 8,
                   "max_num_seqs": 16},
        "store": store_args,
        "adapter_dir": str(root / "adapters"),
        "refresh_interval_s": 2.0,
        "max_body_bytes": 64 * 1024,
        "engine_num_cpus": 1.0,
        "ingress_num_cpus": 0.5,
    }
    serve.run(build_app(config), name="eraser-tests", route_prefix="/", blocking=False)
    _wait_ready(f"http://127.0.0.1:{port}")
    yield Served(base_url=f"http://127.0.0.1:{port}", base_dir=base, store=store, admin_key=admin_key, keys=keys,
                 adapters=adapters, versions=versions, data_versions=data_versions)
    serve.delete("eraser-tests")
    serve.shutdown()
    if started_ray:
        ray.shutdown()


def _wait_ready(base_url: str, timeout: float = 180.0) -> None:
    import time

    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"serve app at {base_url} not ready after {timeout}s")
