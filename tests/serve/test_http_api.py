"""Auth, isolation, bad input, erasure and admin routes: every refusal is a 4xx in OpenAI's error shape
and changes nothing."""

from __future__ import annotations

import uuid

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow


def call(served, method: str, path: str, key: str | None = None, **kwargs) -> httpx.Response:
    headers = kwargs.pop("headers", {})
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.request(method, f"{served.base_url}{path}", headers=headers, timeout=60, **kwargs)


def assert_error(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], (word, error["message"])
    return error


def chat(model: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "What is the code of customer 1?"}],
            "max_tokens": 4, "temperature": 0, **extra}


def receipts(served, tenant: str) -> list[str]:
    return sorted(r.request_id for r in served.store.list_receipts(tenant))


# -- authentication and isolation -------------------------------------------------------------


def test_missing_and_wrong_keys_are_401(served):
    assert_error(call(served, "POST", "/v1/chat/completions", json=chat("acme")), 401, "missing API key")
    assert_error(call(served, "POST", "/v1/chat/completions", "ek_acme_00000000_" + "x" * 40, json=chat("acme")), 401)
    assert_error(call(served, "GET", "/v1/models", "nonsense"), 401)
    assert_error(call(served, "POST", "/v1/chat/completions", json=chat("acme"),
                      headers={"Authorization": "Basic abc"}), 401, "Bearer")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="wrong", max_retries=0).models.list()


def test_a_key_revoked_over_http_is_refused_within_a_second(served):
    import time

    key = call(served, "POST", "/v1/admin/tenants/beta/keys", served.admin_key).json()["api_key"]
    for _ in range(3):  # verified, then trusted from the ingress's cache
        assert call(served, "GET", "/v1/models", key).status_code == 200
    key_id = key.split("_")[2]
    assert_error(call(served, "DELETE", f"/v1/admin/tenants/beta/keys/{key_id}", served.keys["beta"]), 403)
    began = time.perf_counter()
    revoked = call(served, "DELETE", f"/v1/admin/tenants/beta/keys/{key_id}", served.admin_key)
    assert revoked.status_code == 200 and revoked.json()["replicas_told"], revoked.text
    while call(served, "GET", "/v1/models", key).status_code != 401:
        assert time.perf_counter() - began < 1.0, "the revoked key still works"
    assert_error(call(served, "DELETE", f"/v1/admin/tenants/beta/keys/{key_id}", served.admin_key), 404)
    assert call(served, "GET", "/v1/models", served.keys["beta"]).status_code == 200


def test_another_tenants_model_is_404_and_indistinguishable_from_a_missing_one(served):
    other = assert_error(call(served, "POST", "/v1/chat/completions", served.keys["acme"], json=chat("beta")), 404)
    missing = assert_error(call(served, "POST", "/v1/chat/completions", served.keys["acme"], json=chat("nosuch")), 404)
    assert other["code"] == missing["code"] == "model_not_found"
    assert other["message"].replace("beta", "X") == missing["message"].replace("nosuch", "X")
    with pytest.raises(openai.NotFoundError):
        served.client("acme").completions.create(model="beta", prompt="hi", max_tokens=2)
    assert_error(call(served, "GET", "/v1/models/beta", served.keys["acme"]), 404)


def test_another_tenants_erasures_receipts_and_state_are_403_and_nothing_changes(served):
    before = receipts(served, "beta")
    request = {"request_id": f"x-{uuid.uuid4().hex[:8]}", "kind": "remove", "records": ["bravo-0"]}
    key = served.keys["acme"]
    assert_error(call(served, "POST", "/v1/tenants/beta/erasures", key, json=request), 403, "beta")
    assert_error(call(served, "POST", "/v1/tenants/beta/erasures", key, json={**request, "tenant": "acme"}), 403)
    assert_error(call(served, "GET", f"/v1/tenants/beta/erasures/{before[0] if before else 'r1'}", key), 403)
    assert_error(call(served, "GET", "/v1/tenants/beta", key), 403)
    assert_error(call(served, "POST", "/v1/admin/tenants", key, json={"name": "evil"}), 403, "admin")
    assert_error(call(served, "GET", "/v1/admin/replicas", key), 403)
    assert receipts(served, "beta") == before
    assert "evil" not in served.store.list_tenants()


def test_admin_key_has_no_model(served):
    assert_error(call(served, "POST", "/v1/chat/completions", served.admin_key, json=chat("acme")), 403)


# -- bad input --------------------------------------------------------------------------------


def test_malformed_json_missing_fields_and_unsupported_parameters_are_400(served):
    key = served.keys["acme"]
    assert_error(call(served, "POST", "/v1/chat/completions", key, content=b'{"model": "acme", "mess'), 400,
                 "not valid JSON")
    assert_error(call(served, "POST", "/v1/chat/completions", key, content=b""), 400, "empty")
    assert_error(call(served, "POST", "/v1/chat/completions", key, json=[1, 2]), 400, "JSON object")
    error = assert_error(call(served, "POST", "/v1/chat/completions", key, json={"model": "acme"}), 400, "messages")
    assert error["param"] == "messages"
    assert_error(call(served, "POST", "/v1/completions", key, json={"prompt": "hi"}), 400, "model")
    assert_error(call(served, "POST", "/v1/chat/completions", key, json=chat("acme", n=2)), 400, "n=1")
    assert_error(call(served, "POST", "/v1/chat/completions", key, json=chat("acme", temperature=7)), 400,
                 "temperature")
    assert_error(call(served, "POST", "/v1/chat/completions", key, json=chat("acme", tools=[{}])), 400, "tools")
    assert_error(call(served, "POST", "/v1/chat/completions", key, json=chat("acme", max_tokens=10**6)), 400,
                 "max_tokens")
    assert_error(call(served, "POST", "/v1/completions", key, json={"model": "acme", "prompt": ""}), 400, "empty")
    with pytest.raises(openai.BadRequestError):
        served.client("acme").chat.completions.create(model="acme", messages=[], max_tokens=2)


def test_prompt_longer_than_the_context_is_400(served):
    response = call(served, "POST", "/v1/completions", served.keys["acme"],
                    json={"model": "acme", "prompt": list(range(5, 300)), "max_tokens": 4})
    assert_error(response, 400)


def test_oversize_body_is_413(served):
    big = chat("acme")
    big["messages"][0]["content"] = "x" * (70 * 1024)
    assert_error(call(served, "POST", "/v1/chat/completions", served.keys["acme"], json=big), 413, "limit")


def test_unknown_route_and_method_are_openai_shaped(served):
    assert_error(call(served, "GET", "/v1/nothing", served.keys["acme"]), 404)
    assert_error(call(served, "GET", "/v1/completions", served.keys["acme"]), 405)


# -- erasure routes ---------------------------------------------------------------------------


def test_erasure_is_recorded_once_per_request_id(served):
    key = served.keys["beta"]
    request_id = f"gdpr-{uuid.uuid4().hex[:8]}"
    body = {"request_id": request_id, "kind": "remove", "records": ["bravo-1"]}
    first = call(served, "POST", "/v1/tenants/beta/erasures", key, json=body)
    assert first.status_code == 202, first.text
    url = first.json()["receipt_url"]
    assert url == f"/v1/tenants/beta/erasures/{request_id}" and first.headers["location"] == url
    assert first.json()["receipt"]["status"] == "pending"
    again = call(served, "POST", "/v1/tenants/beta/erasures", key, json=body)
    assert again.status_code == 200 and again.json()["created"] is False
    assert again.json()["receipt"]["created_at"] == first.json()["receipt"]["created_at"]
    receipt = call(served, "GET", url, key)
    assert receipt.status_code == 200 and receipt.json()["request"]["records"] == ["bravo-1"]
    assert call(served, "GET", url, served.admin_key).status_code == 200
    conflict = call(served, "POST", "/v1/tenants/beta/erasures", key, json={**body, "records": ["bravo-2"]})
    assert_error(conflict, 409, request_id)
    assert receipts(served, "beta").count(request_id) == 1


def test_bad_erasure_requests_are_refused_and_nothing_is_recorded(served):
    key = served.keys["beta"]
    before = receipts(served, "beta")
    rid = f"bad-{uuid.uuid4().hex[:8]}"
    assert_error(call(served, "POST", "/v1/tenants/beta/erasures", key,
                      json={"request_id": rid, "kind": "remove", "records": ["no-such-record"]}), 400, "no-such-record")
    assert_error(call(served, "POST", "/v1/tenants/beta/erasures", key,
                      json={"request_id": rid, "kind": "explode", "records": ["bravo-1"]}), 400, "kind")
    assert_error(call(served, "POST", "/v1/tenants/beta/erasures", key, json={"kind": "remove"}), 400, "request_id")
    assert_error(call(served, "POST", "/v1/tenants/beta/erasures", key,
                      json={"request_id": rid, "kind": "correct_response", "records": ["bravo-1"]}), 400,
                 "replacements")
    assert_error(call(served, "POST", "/v1/tenants/beta/erasures", key, content=b"{nope"), 400, "JSON")
    assert_error(call(served, "GET", f"/v1/tenants/beta/erasures/{rid}", key), 404)
    assert receipts(served, "beta") == before


def test_unknown_tenant_routes(served):
    assert_error(call(served, "GET", "/v1/tenants/nosuch", served.admin_key), 404, "nosuch")
    assert_error(call(served, "GET", "/v1/tenants/nosuch", served.keys["acme"]), 403)
    assert_error(call(served, "POST", "/v1/tenants/nosuch/erasures", served.admin_key,
                      json={"request_id": "r1", "kind": "remove", "records": ["a"]}), 404, "nosuch")


def test_tenant_state_shows_live_versions(served):
    state = call(served, "GET", "/v1/tenants/acme", served.keys["acme"]).json()
    head, _ = served.store.get_head("acme")
    assert (state["adapter_version"], state["data_version"]) == (head.adapter, head.data)
    assert state["model"] == "acme" and "key_hashes" not in state["config"]


# -- admin routes -----------------------------------------------------------------------------


def test_admin_onboarding_create_upload_train(served):
    name = f"new-{uuid.uuid4().hex[:6]}"
    created = call(served, "POST", "/v1/admin/tenants", served.admin_key, json={"name": name})
    assert created.status_code == 201, created.text
    key = created.json()["api_key"]
    assert created.json()["tenant"]["base_model"] == "tiny"
    assert_error(call(served, "POST", "/v1/admin/tenants", served.admin_key, json={"name": name}), 409)
    assert_error(call(served, "POST", "/v1/admin/tenants", served.admin_key, json={"name": "Bad Name!"}), 400)

    state = call(served, "GET", f"/v1/tenants/{name}", key).json()
    assert state["adapter_version"] is None
    assert [m["id"] for m in call(served, "GET", "/v1/models", key).json()["data"]] == [name]
    assert_error(call(served, "POST", "/v1/chat/completions", key, json=chat(name)), 404, "no published adapter")

    lines = "\n".join(f'{{"id": "r{i}", "prompt": "q{i}", "response": "a{i}"}}' for i in range(3))
    uploaded = call(served, "POST", f"/v1/admin/tenants/{name}/records", served.admin_key, content=lines.encode(),
                    headers={"content-type": "application/x-ndjson"})
    assert uploaded.status_code == 201, uploaded.text
    assert served.store.read_dataset(name, uploaded.json()["data_version"])[2].response == "a2"
    as_json = call(served, "POST", f"/v1/admin/tenants/{name}/records", served.admin_key,
                   json={"records": [{"id": "j1", "prompt": "q", "response": "a"}]})
    assert as_json.status_code == 201 and as_json.json()["data_version"] != uploaded.json()["data_version"]
    bad = call(served, "POST", f"/v1/admin/tenants/{name}/records", served.admin_key, content=b'{"id": "x"}\n')
    assert_error(bad, 400, ":1")
    # training runs in the cluster layer; without a backend the route says so
    assert_error(call(served, "POST", f"/v1/admin/tenants/{name}/train", served.admin_key), 501)
    assert name in call(served, "GET", "/v1/admin/tenants", served.admin_key).json()["tenants"]
