"""Hostile or careless HTTP input against the real ingress (auth, routes, store on SeaweedFS) with a
fake engine behind it: every malformed body is an OpenAI-shaped 4xx and changes nothing."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.serve.local_ingress import LocalService
from tests.tenants.helpers import onboard

DEEP = "[" * 100_000 + "]" * 100_000


def run(coroutine):
    return asyncio.run(coroutine)


async def started(store, tmp_path, **fields) -> tuple[LocalService, str, str]:
    onboard(store, tmp_path, "acme")
    key = store.issue_key("acme")
    admin = store.ensure_admin_key()
    return await LocalService(store, tmp_path, **fields).start(), key, admin


def state(store) -> tuple:
    """What a refused request must leave unchanged."""
    return (store.list_tenants(), [r.request_id for r in store.list_receipts("acme")], store.list_data_versions("acme"),
            [k.key_id for k in store.list_keys("acme")])


def assert_openai_4xx(response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    return error


def bodies(route: str) -> dict[str, bytes]:
    """Malformed bodies for a route (raw bytes, as a hostile client sends them)."""
    good = {"/v1/completions": '{"model": "acme", "prompt": "hi", "max_tokens": 2%s}',
            "/v1/chat/completions": '{"model": "acme", "messages": [{"role": "user", "content": "hi"}]%s}',
            "/v1/tenants/acme/erasures": '{"request_id": "e1", "kind": "remove", "records": ["r1"]%s}',
            "/v1/admin/tenants": '{"name": "newco"%s}'}[route]
    return {
        "deep nesting": (good % (', "user": ' + DEEP)).encode(),
        "huge integer (5000 digits)": (good % (', "seed": ' + "9" * 5000)).encode(),
        "integer beyond 2^64": (good % ', "seed": 36893488147419103232').encode(),
        "seed 2^64": (good % ', "seed": 18446744073709551616').encode(),
        "lone surrogate in a value": (good % ', "user": "\\ud800"').encode(),
        "lone surrogate in a key": (good % ', "\\udc00": 1').encode(),
        "Infinity": (good % ', "temperature": Infinity').encode(),
        "NaN": (good % ', "temperature": NaN').encode(),
        "not UTF-8": (good % ', "user": "\xff"').encode("latin-1"),
    }


ROUTES = ["/v1/completions", "/v1/chat/completions", "/v1/tenants/acme/erasures", "/v1/admin/tenants"]


def test_every_malformed_body_is_an_openai_shaped_400_and_changes_nothing(store, tmp_path):
    async def main():
        service, key, admin = await started(store, tmp_path)
        before = state(store)
        attempts = 0
        try:
            for route in ROUTES:
                bearer = admin if route == "/v1/admin/tenants" else key
                for name, body in bodies(route).items():
                    response = await service.http.post(route, content=body, headers={
                        "authorization": f"Bearer {bearer}", "content-type": "application/json"})
                    assert response.status_code == 400, (route, name, response.status_code, response.text[:200])
                    assert_openai_4xx(response)
                    attempts += 1
        finally:
            await service.close()
        assert state(store) == before
        return attempts

    assert run(main()) == 4 * 9


def test_token_ids_and_seeds_out_of_range_are_400(store, tmp_path):
    async def main():
        service, key, _ = await started(store, tmp_path)
        auth = {"authorization": f"Bearer {key}"}
        try:
            for body, param in [({"model": "acme", "prompt": [1, 2**40]}, "prompt"),
                                ({"model": "acme", "prompt": [-1]}, "prompt"),
                                ({"model": "acme", "prompt": "hi", "seed": 2**64}, "seed"),
                                ({"model": "acme", "prompt": "hi", "seed": -(2**63) - 1}, "seed")]:
                error = assert_openai_4xx(await service.http.post("/v1/completions", json=body, headers=auth))
                assert error["param"] == param
            ok = await service.http.post("/v1/completions", headers=auth,
                                         json={"model": "acme", "prompt": "hi", "max_tokens": 1, "seed": 2**64 - 1})
            assert ok.status_code == 200, ok.text
        finally:
            await service.close()

    run(main())


def test_erasure_ids_are_limited_and_a_large_request_does_not_stall_the_ingress(store, tmp_path):
    async def main():
        service, key, _ = await started(store, tmp_path, max_erasure_ids=1000, max_body_bytes=4 << 20)
        auth = {"authorization": f"Bearer {key}"}
        before = state(store)
        try:
            ids = [f"r{i:06d}" for i in range(100_000)]  # about 1.2 MiB
            began = time.perf_counter()
            error = assert_openai_4xx(await service.http.post(
                "/v1/tenants/acme/erasures", headers=auth,
                json={"request_id": "big", "kind": "remove", "records": ids}))
            refused = time.perf_counter() - began
            assert error["code"] == "too_many_records" and error["param"] == "records"
            # within the limit: a duplicate is found at once, not after a quadratic scan
            error = assert_openai_4xx(await service.http.post(
                "/v1/tenants/acme/erasures", headers=auth,
                json={"request_id": "dup", "kind": "remove", "records": ids[:999] + ["r000001"]}))
            assert "more than once" in error["message"]
        finally:
            await service.close()
        assert state(store) == before
        assert refused < 2.0, refused

    run(main())


def test_big_selection_within_a_raised_limit_is_validated_in_linear_time(store, tmp_path):
    async def main():
        service, key, _ = await started(store, tmp_path, max_erasure_ids=200_000, max_body_bytes=4 << 20)
        try:
            ids = [f"r{i:06d}" for i in range(100_000)]
            began = time.perf_counter()
            error = assert_openai_4xx(await service.http.post(
                "/v1/tenants/acme/erasures", headers={"authorization": f"Bearer {key}"},
                json={"request_id": "big", "kind": "remove", "records": ids}))
            return error, time.perf_counter() - began
        finally:
            await service.close()

    error, seconds = run(main())
    assert error["code"] == "unknown_record" and seconds < 5.0, (error, seconds)


def test_subject_given_in_another_form_is_erased_not_refused(store, tmp_path):
    async def main():
        service, key, _ = await started(store, tmp_path)  # records of subjects user0, user1, user2
        try:
            response = await service.http.post(
                "/v1/tenants/acme/erasures", headers={"authorization": f"Bearer {key}"},
                json={"request_id": "dsr-1", "kind": "remove", "subjects": ["  USER1 "]})
            assert response.status_code == 202, response.text
        finally:
            await service.close()

    run(main())
    receipt = store.get_receipt("acme", "dsr-1")
    head, _ = store.get_head("acme")
    assert receipt.request.resolve(store.iter_dataset("acme", head.data)) == ["r1", "r4"]


@pytest.mark.parametrize("body, code", [
    ({"name": "newco", "training": {"lr": "Infinity"}}, "invalid_json"),
    ({"name": "newco", "base_model": "tiny-llama", "lora": {"rank": 64}}, "lora_rank_too_large"),
])
def test_tenant_the_method_or_engine_would_refuse_later_is_refused_at_creation(store, tmp_path, body, code):
    async def main():
        service, _, admin = await started(store, tmp_path)  # the engine's max_lora_rank: 16
        try:
            raw = json.dumps(body).replace('"Infinity"', "Infinity")
            return await service.http.post("/v1/admin/tenants", content=raw, headers={
                "authorization": f"Bearer {admin}", "content-type": "application/json"})
        finally:
            await service.close()

    error = assert_openai_4xx(run(main()))
    assert error["code"] == code, error
    assert not store.tenant_exists("newco")


def test_malformed_records_uploads_are_400_and_write_no_data_version(store, tmp_path):
    async def main():
        service, _, admin = await started(store, tmp_path)
        before = state(store)
        lines = {"deep nesting": '{"id": "x", "prompt": "p", "response": "r", "subject": ' + DEEP + "}",
                 "huge integer": '{"id": ' + "7" * 5000 + ', "prompt": "p", "response": "r"}',
                 "lone surrogate": '{"id": "x", "prompt": "\\ud800", "response": "r"}',
                 "empty response": '{"id": "x", "prompt": "p", "response": ""}'}
        try:
            for name, line in lines.items():
                for content_type, body in [("application/x-ndjson", line),
                                           ("application/json", '{"records": [' + line + "]}")]:
                    response = await service.http.post("/v1/admin/tenants/acme/records", content=body.encode(),
                                                       headers={"authorization": f"Bearer {admin}",
                                                                "content-type": content_type})
                    assert 400 <= response.status_code < 500, (name, content_type, response.status_code)
                    assert_openai_4xx(response)
        finally:
            await service.close()
        assert state(store) == before

    run(main())
