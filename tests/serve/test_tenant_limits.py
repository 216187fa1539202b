"""Fairness between tenants at the real ingress (fake engine that holds every token until released):
one tenant's flood is cut at its concurrency limit with 429s while another tenant is served."""

from __future__ import annotations

import asyncio

from tests.serve.local_ingress import LocalService
from tests.tenants.helpers import onboard


def test_one_tenant_cannot_take_every_slot_and_its_slots_come_back(store, tmp_path):
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
            again = [asyncio.ensure_future(post(service, "acme", stream=True)) for _ in range(3)]
            assert [(await f).status_code for f in again] == [200] * 3  # every slot came back
        finally:
            await service.close()

    asyncio.run(main())
