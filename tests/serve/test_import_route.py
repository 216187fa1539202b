"""``POST /v1/admin/tenants/{t}/import``: the handler called directly (no Ray Serve, no vLLM) with the
session's S3 server and the cluster layer in this process as the backend. Every refusal is OpenAI-shaped
and writes nothing."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid

import pytest
import torch
from starlette.requests import Request

from serve.backend import BackendContext, ClusterBackend, PendingOnlyBackend
from serve.config import ServeConfig
from serve.api_errors import error_response
from serve.ingress import ApiError, Ingress
from tests.cli.test_tenants_import import BASE_NAME, chat_records, other_base, peft_adapter, split
from tests.cluster.helpers import build_base

pytestmark = pytest.mark.slow

ADMIN_KEY = "admin-key-for-the-import-route-tests"


class FakeBoard:
    """The adapter board's ``publish.remote`` (what tells the replicas), recorded."""

    def __init__(self) -> None:
        self.published: list[tuple] = []
        board = self

        class Publish:
            @staticmethod
            def remote(*args):
                board.published.append(args)

        self.publish = Publish()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("import-route")
    base = build_base(root / "base")
    train, reference = split(chat_records())
    yield {"base": base, "train": train, "reference": reference, "adapter": peft_adapter(base, train, root / "adapter"),
           "foreign": peft_adapter(other_base(root / "other"), train, root / "foreign", steps=1)}
    torch.set_num_threads(previous)


@pytest.fixture
def ingress(world, s3_server, s3_bucket, tmp_path, monkeypatch):
    """An Ingress without Ray Serve: the session's S3 under a fresh prefix, in-process coordinators."""
    from cluster.service import LocalErasureService
    from tenants.keys import ADMIN_KEY_ENV
    from tenants.store import TenantStore

    monkeypatch.setenv(ADMIN_KEY_ENV, ADMIN_KEY)
    settings = s3_server.settings(bucket=s3_bucket, prefix=f"route-{uuid.uuid4().hex[:8]}", cache_dir=tmp_path / "cache")
    store = TenantStore(settings)
    store.put_model(BASE_NAME, world["base"])
    this = Ingress.__new__(Ingress)
    this.config = ServeConfig.model_validate({"engine": {"model": BASE_NAME}})
    this.store, this.board = store, FakeBoard()
    this._init_guards()
    this.backend = ClusterBackend(LocalErasureService(settings), BackendContext(
        store_settings=settings, notify_switch=lambda tenant, version: None, app_name="tests"))
    yield this
    this.backend.close()  # its reconciler would outlive the test (and the S3 server)


def post(ingress, tenant: str, body, key: str | None = ADMIN_KEY) -> tuple[int, dict]:
    """Call the route's handler as the HTTP server would; (status, JSON body)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    if key is not None:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    scope = {"type": "http", "method": "POST", "path": f"/v1/admin/tenants/{tenant}/import", "headers": headers,
             "query_string": b""}

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    async def call():
        try:
            response = await Ingress.admin_import_tenant(ingress, tenant, Request(scope, receive))
        except ApiError as error:
            response = error_response(error)
        return response.status_code, json.loads(response.body)

    return asyncio.run(call())


def import_body(world, adapter=None, **change) -> dict:
    adapter = adapter or world["adapter"]
    return {
        "adapter": {"adapter_config.json": json.loads((adapter / "adapter_config.json").read_text()),
                    "adapter_model.safetensors": base64.b64encode(
                        (adapter / "adapter_model.safetensors").read_bytes()).decode()},
        "records": "".join(r.model_dump_json(exclude_none=True) + "\n" for r in world["train"]),
        "reference": [r.model_dump(mode="json", exclude_none=True) for r in world["reference"]],
        **change,
    }


def everything(store) -> dict[str, str]:
    return {info.key: info.etag for info in store.io.list(store.layout.prefix + "/")}


def test_an_import_over_http_creates_the_tenant_issues_a_key_and_tells_the_replicas(world, ingress):
    status, body = post(ingress, "acme", import_body(world, recipe={"max_length": 96}))

    assert status == 201, body
    assert body["head"]["adapter"] == "v000001" and body["head"]["data"] == "d000001"
    assert body["retrain_fallback"] == "unavailable: imported without a training recipe"
    assert body["tenant"]["training"]["heldout_unit"] == "given" and body["tenant"]["training"]["max_length"] == 96
    assert ingress.store.authenticate(body["api_key"]) == "acme"
    manifest = ingress.store.get_adapter_manifest("acme", "v000001")
    assert manifest.path == "import" and manifest.arguments["imported"]["via"] == "http"
    assert manifest.checks["import"]["adapter_loads"] and manifest.checks["heldout_records"] == len(world["reference"])
    dataset = ingress.store.read_dataset("acme", "d000001")
    assert [r.id for r in dataset if r.heldout] == [r.id for r in world["reference"]]
    assert ingress.board.published == [("acme", "v000001", ingress.config.switch_timeout_s)]


def refusal(world, ingress, case: str) -> tuple[dict, str | None, int, str, str]:
    """(body, key, status, code, words) of ``case``."""
    train = world["train"]
    if case == "no key":
        return import_body(world), None, 401, "missing_api_key", "missing API key"
    if case == "a tenant's key":
        ingress.store.create_tenant(_tenant("beta"))
        return import_body(world), ingress.store.issue_key("beta"), 403, "permission_denied", "admin key"
    if case == "adapter for another base":
        return import_body(world, world["foreign"]), ADMIN_KEY, 400, "invalid_adapter", "does not fit base model"
    if case == "reference overlaps the records":
        body = import_body(world)
        body["reference"].append(train[0].model_dump(mode="json", exclude_none=True) | {"id": "copy"})
        return body, ADMIN_KEY, 400, "invalid_records", f"'copy' = training '{train[0].id}'"
    if case == "invalid record line":
        body = import_body(world)
        body["records"] += '{"id": "x", "prompt": "no response"}\n'
        return body, ADMIN_KEY, 400, "invalid_records", f"records:{len(train) + 1}: "
    if case == "weights not base64":
        body = import_body(world)
        body["adapter"]["adapter_model.safetensors"] = "not base64!"
        return body, ADMIN_KEY, 400, "invalid_request", "must be base64"
    if case == "unknown field":
        return import_body(world, heldout_fraction=0.2), ADMIN_KEY, 400, "invalid_request", "unknown field(s)"
    if case == "partial recipe":
        return import_body(world, recipe={"lr": 0.1}), ADMIN_KEY, 400, "invalid_config", "missing ['epochs', 'batch_size']"
    if case == "tenant exists":
        ingress.store.create_tenant(_tenant("acme"))
        return import_body(world), ADMIN_KEY, 409, "tenant_exists", "already exists"
    if case == "no cluster backend":
        ingress.backend = PendingOnlyBackend()
        return import_body(world), ADMIN_KEY, 501, "not_implemented", "eraser tenants import"
    if case == "too large":
        ingress.config = ingress.config.model_copy(update={"max_upload_bytes": 4096})
        return import_body(world), ADMIN_KEY, 413, "request_too_large", "exceeds the limit of 4096 bytes"
    raise AssertionError(case)


def _tenant(name: str):
    from tenants.models import TenantConfig

    return TenantConfig(name=name, base_model=BASE_NAME)


@pytest.mark.parametrize("case", ["no key", "a tenant's key", "adapter for another base", "reference overlaps the records",
                                  "invalid record line", "weights not base64", "unknown field", "partial recipe",
                                  "tenant exists", "no cluster backend", "too large"])
def test_refusals_are_openai_shaped_and_write_nothing(world, ingress, case):
    body, key, status, code, words = refusal(world, ingress, case)
    before = everything(ingress.store)

    got, answer = post(ingress, "acme", body, key)

    assert got == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["code"] == code and words in answer["error"]["message"], answer
    assert everything(ingress.store) == before
    assert ingress.board.published == []


def test_on_a_ray_cluster_the_adapter_is_checked_in_a_task_and_refusals_come_back_as_such(world, ingress, ray_cluster):
    """The serving app's backend: the ingress loads no model; a Ray task checks the adapter (sent by value)."""
    from cluster.config import RunnerSpec
    from cluster.service import RayErasureService

    # The session's 2-CPU head may be serving the package's Serve app (engine 1 CPU, ingress 0.5): the check
    # asks for what is left, and a check that cannot be placed fails in minutes, not the default hour.
    service = RayErasureService(ingress.store.settings, RunnerSpec(cpus_per_worker=0.25, job_timeout_s=300),
                                namespace=f"eraser-test-{uuid.uuid4().hex[:8]}")
    ingress.backend = ClusterBackend(service, BackendContext(
        store_settings=ingress.store.settings, notify_switch=lambda tenant, version: None, app_name="tests"))
    before = everything(ingress.store)

    status, answer = post(ingress, "acme", import_body(world, world["foreign"]))
    assert status == 400 and answer["error"]["code"] == "invalid_adapter", answer
    assert "does not fit base model" in answer["error"]["message"] and "size mismatch" in answer["error"]["message"]
    assert everything(ingress.store) == before

    status, body = post(ingress, "acme", import_body(world))
    assert status == 201, body
    assert ingress.store.get_adapter_manifest("acme", "v000001").checks["import"]["records_encoded"] == 40
