"""One served application for the tests of this package (torn down after them, so its CPUs go back
to the session's Ray head): real SeaweedFS, real Ray Serve, one real vLLM engine.

``served`` builds a tiny base model and three LoRA adapters (tenant ``acme`` v1 and v2, tenant
``beta`` v1), puts them in the store exactly as the erasure path would (publish + move HEAD), and
runs ``serve.app:build_app`` on the session's Ray head (``ray_cluster``). Tests that move HEAD restore it afterwards.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cli.demo.clients import wait_ready
from tests.serve import models

logger = logging.getLogger(__name__)

TENANTS = {"acme": "alpha", "beta": "bravo"}  # tenant -> tag of its first adapter's records
SWITCH_TAG = "charlie"  # acme's second adapter (what an erasure would publish)
APP = "eraser-tests"


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
    config: dict = field(default_factory=dict)  # the application's ServeConfig fields

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
def serving_base(tmp_path_factory) -> Path:
    return models.build_base(tmp_path_factory.mktemp("serving-base") / "base", [*TENANTS.values(), SWITCH_TAG])


@pytest.fixture(scope="package")
def served(serving_base, ray_cluster, s3_server, s3_bucket, tmp_path_factory):
    """The application, started while the adapters train (the engine needs only the base to start)."""
    import threading

    from ray import serve

    from serve.app import build_app
    from tenants.keys import ADMIN_KEY_ENV
    from tenants.models import AdapterManifest, Head, TenantConfig
    from tenants.store import TenantStore

    began = time.perf_counter()
    base = serving_base
    root = tmp_path_factory.mktemp("served")
    settings = s3_server.settings(bucket=s3_bucket, prefix=f"serve-{uuid.uuid4().hex[:8]}", cache_dir=root / "cache")
    store = TenantStore(settings)
    store.put_model("tiny", base)
    keys, data_versions = {}, {}
    for tenant, tag in TENANTS.items():
        store.create_tenant(TenantConfig(name=tenant, base_model="tiny"))
        keys[tenant] = store.issue_key(tenant, "tests")
        data_versions[tenant] = store.put_dataset(tenant, [r.to_json() for r in models.tenant_records(tag)])
    admin_key = os.environ.get(ADMIN_KEY_ENV) or store.ensure_admin_key() or store.rotate_admin_key()
    logger.info("%.1fs: store ready", time.perf_counter() - began)

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    store_args = {"endpoint": settings.endpoint, "bucket": settings.bucket, "prefix": settings.prefix,
                  "access_key": settings.access_key, "secret_key": settings.secret_key.get_secret_value(),
                  "region": settings.region, "cache_dir": str(root / "replica-cache")}
    config = {
        "app_name": APP,
        "engine": {"model": "tiny", "max_model_len": 256, "max_loras": 2, "max_cpu_loras": 4, "max_lora_rank": 8,
                   "max_num_seqs": 16},
        "store": store_args,
        "adapter_dir": str(root / "adapters"),
        "refresh_interval_s": 2.0,
        "max_body_bytes": 64 * 1024,
        "auth_failures_per_minute": 1000,  # the tests' wrong keys all come from 127.0.0.1
        "max_concurrent_per_tenant": 4,  # a quarter of max_num_seqs: a flooding tenant leaves room for others
        "engine_num_cpus": 1.0,
        "ingress_num_cpus": 0.5,
    }
    failure: list[BaseException] = []

    def deploy() -> None:
        try:
            serve.run(build_app(config), name=APP, route_prefix="/", blocking=False)
        except BaseException as error:  # re-raised below
            failure.append(error)

    deploying = threading.Thread(target=deploy, daemon=True)
    deploying.start()
    adapters, versions = {}, {}
    for tenant, tag in [*TENANTS.items(), ("acme", SWITCH_TAG)]:
        name = f"{tenant}@v{sum(1 for k in adapters if k.startswith(tenant + '@')) + 1}"
        adapters[name] = models.train_adapter(base, models.tenant_records(tag), root / name)
        versions[name] = store.publish_adapter(tenant, adapters[name], AdapterManifest(
            data_version=data_versions[tenant], path="train" if name.endswith("@v1") else "retrain"))
        if name.endswith("@v1"):
            store.move_head(tenant, Head(adapter=versions[name], data=data_versions[tenant]), None)
    logger.info("%.1fs: adapters trained and published", time.perf_counter() - began)
    deploying.join()
    if failure:
        raise failure[0]
    wait_ready(f"http://127.0.0.1:{port}", timeout_s=180.0)
    logger.info("%.1fs: application ready", time.perf_counter() - began)
    yield Served(base_url=f"http://127.0.0.1:{port}", base_dir=base, store=store, admin_key=admin_key, keys=keys,
                 adapters=adapters, versions=versions, data_versions=data_versions, config=config)
    serve.shutdown()
    logger.info("%.1fs: serve shut down", time.perf_counter() - began)

