"""Fairness between tenants at the real ingress (fake engine that holds every token until released):
one tenant's flood is cut at its concurrency limit, and a tenant past its token budget is refused, with
429s while another tenant is served."""

from __future__ import annotations

import asyncio

import pytest

from serve.token_budget import TokenBudget
from tests.serve.local_ingress import LocalService
from tests.tenants.helpers import onboard


def test_one_tenant_cannot_take_every_slot_and_its_slots_come_back(store, tmp_path, recorded_metrics):
    onboard(store, tmp_path, "acme")
    onboard(store, tmp_path, "beta")
    keys = {t: store.issue_key(t) for t in ("acme", "beta")}

    def post(service, tenant, stream=False):
        return service.http.post("/v1/completions", headers={"authorization": f"Bearer {keys[tenant]}"},
                                 json={"model": tenant, "prompt": "hi", "max_tokens": 2, "stream": stream})

    async def main():
        service = await LocalService(store, tmp_path, max_concurrent_per_tenant=3).start()
        try:
            for tenant in keys:  # trust the keys, load the adapters
                assert (await post(service, tenant)).status_code == 200
            gate = service.engine_fake.gate = asyncio.Event()
            flood = [asyncio.ensure_future(post(service, "acme", stream=k % 2 == 0)) for k in range(3)]
            await asyncio.sleep(0.3)  # the 3 are running, held at the gate
            over = [await post(service, "acme") for _ in range(5)]
            assert [r.status_code for r in over] == [429] * 5
            error = over[0].json()["error"]
            assert error["type"] == "rate_limit_error" and error["code"] == "tenant_concurrency_limit"
            victim = asyncio.ensure_future(post(service, "beta"))  # another tenant still gets in
            await asyncio.sleep(0.2)
            gate.set()
            assert (await victim).status_code == 200
            assert [(await f).status_code for f in flood] == [200, 200, 200]
            assert service.ingresses[0]._running == {"acme": 0, "beta": 0}
            running = recorded_metrics.values("eraser_tenant_generations_running", tenant="acme")
            assert max(running) == 3 and running[-1] == 0  # the queue depth a scrape would have seen
            usage = (await victim).json()["usage"]  # beta's second generation; its first trusted the key
            assert recorded_metrics.values("eraser_tokens_total", tenant="beta", kind="completion")[-1] == \
                usage["completion_tokens"] > 0
            assert recorded_metrics.values("eraser_tokens_total", tenant="beta", kind="prompt")[-1] == \
                usage["prompt_tokens"] > 0
            again = [asyncio.ensure_future(post(service, "acme", stream=True)) for _ in range(3)]
            assert [(await f).status_code for f in again] == [200] * 3  # every slot came back
        finally:
            await service.close()

    asyncio.run(main())


def test_a_tenant_past_its_token_budget_gets_429_with_retry_after_and_the_other_is_served(store, tmp_path):
    onboard(store, tmp_path, "acme")
    onboard(store, tmp_path, "beta")
    keys = {t: store.issue_key(t) for t in ("acme", "beta")}

    def post(service, tenant, max_tokens, route="completions", stream=False):
        body = {"model": tenant, "max_tokens": max_tokens, "stream": stream}
        if route == "completions":
            body["prompt"] = "hi"
        else:
            body["messages"] = [{"role": "user", "content": "hi"}]
        return service.http.post(f"/v1/{route}", headers={"authorization": f"Bearer {keys[tenant]}"}, json=body)

    async def main():
        service = await LocalService(store, tmp_path, tenant_tokens_per_minute=120).start()  # 2 tokens a second
        budget = service.ingresses[0]._tokens = TokenBudget(120, clock=lambda: 0.0)  # time stands still
        try:
            ok = await post(service, "acme", 2)  # reserves 2 + 2 prompt bytes, uses 3 + 2 (the fake's usage)
            assert ok.status_code == 200 and ok.json()["usage"]["total_tokens"] == 5
            assert ok.headers["x-ratelimit-limit-tokens"] == "120"
            assert int(ok.headers["x-ratelimit-remaining-tokens"]) == 115
            never = await post(service, "acme", 119)  # 121 tokens at worst: more than the whole budget
            assert never.status_code == 400 and never.json()["error"]["code"] == "request_too_large"
            chat = await post(service, "acme", 100, route="chat/completions")
            assert chat.status_code == 200, chat.text  # uses 103
            refused = await post(service, "acme", 30)
            assert refused.status_code == 429, refused.text
            error = refused.json()["error"]
            assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
            assert refused.headers["retry-after"] == "10"  # 20 missing at 2 a second
            assert refused.headers["x-ratelimit-remaining-tokens"] == "12"
            assert refused.headers["x-ratelimit-reset-tokens"] == "54s"
            assert budget.available("acme") == 12  # the refusal took nothing
            other = await post(service, "beta", 30, route="chat/completions")
            assert other.status_code == 200  # another tenant is served
            gate = service.engine_fake.gate = asyncio.Event()
            held = asyncio.ensure_future(post(service, "beta", 40, stream=True))
            await asyncio.sleep(0.2)
            assert budget.available("beta") == 120 - 33 - 42  # reserved while it streams
            gate.set()
            assert (await held).status_code == 200
            assert budget.available("beta") == 120 - 33 - 43  # settled at its end
            assert service.ingresses[0]._running == {"acme": 0, "beta": 0}
        finally:
            await service.close()

    asyncio.run(main())


def test_no_token_limit_when_it_is_off(store, tmp_path):
    onboard(store, tmp_path, "acme")
    key = store.issue_key("acme")

    async def main():
        service = await LocalService(store, tmp_path, tenant_tokens_per_minute=None).start()
        try:
            response = await service.http.post("/v1/completions", headers={"authorization": f"Bearer {key}"},
                                               json={"model": "acme", "prompt": "hi", "max_tokens": 1024})
            assert response.status_code == 200 and "x-ratelimit-limit-tokens" not in response.headers
        finally:
            await service.close()

    asyncio.run(main())


def test_a_stream_whose_client_left_before_its_first_byte_still_frees_its_slot():
    """The body's own cleanup never runs for a generator that never started; the response's does."""
    from starlette.requests import ClientDisconnect

    from serve.openai_routes import ClosingStream

    body_ran, closed = [], []

    async def events():
        body_ran.append(True)
        yield b"data: [DONE]\n\n"

    async def gone(message):
        raise OSError("client disconnected")

    async def receive():
        return {"type": "http.disconnect"}

    response = ClosingStream(events(), lambda: closed.append(True), media_type="text/event-stream")
    with pytest.raises(ClientDisconnect):  # starlette's word for the OSError
        asyncio.run(response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, gone))
    assert closed == [True] and body_ran == []


def test_a_stream_whose_client_left_midway_settles_what_it_generated_before_the_fallback():
    """A body the client abandoned is closed at once, so its own cleanup (the real usage) runs before
    the response's fallback (which settles to nothing used)."""
    from starlette.requests import ClientDisconnect

    from serve.openai_routes import ClosingStream

    order, sent = [], []

    async def events():
        try:
            yield b"data: 1\n\n"
            yield b"data: 2\n\n"
        finally:
            order.append("body settled its usage")

    async def send(message):
        if message.get("type") == "http.response.body" and sent:
            raise OSError("client disconnected")
        sent.append(message)

    async def receive():
        return {"type": "http.disconnect"}

    response = ClosingStream(events(), lambda: order.append("fallback"), media_type="text/event-stream")
    with pytest.raises(ClientDisconnect):
        asyncio.run(response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send))
    assert order == ["body settled its usage", "fallback"]
