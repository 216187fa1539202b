"""API keys against the real ingress (store on SeaweedFS): failed keys are cached and rate limited
per client address, and a key revoked over HTTP stops working on every ingress replica within a second."""

from __future__ import annotations

import asyncio
import time

from tenants.keys import new_key
from tests.serve.local_ingress import LocalService
from tests.tenants.helpers import onboard


def counting(ingress) -> list[str]:
    """The S3 operations an ingress replica's store makes from now on."""
    calls: list[str] = []
    real = ingress.store.io.call

    def call(operation, **kwargs):
        calls.append(operation)
        return real(operation, **kwargs)

    ingress.store.io.call = call
    return calls


def models(client, key):
    return client.get("/v1/models", headers={"authorization": f"Bearer {key}"})


def test_a_failed_key_is_refused_from_cache_and_failures_are_rate_limited_per_address(store, tmp_path):
    onboard(store, tmp_path, "acme")
    good = store.issue_key("acme")

    async def main():
        service = await LocalService(store, tmp_path, auth_failures_per_minute=5).start()
        try:
            calls = counting(service.ingresses[0])
            fake = new_key("acme")[0]  # well formed, of an existing tenant: an S3 read and a scrypt
            assert (await models(service.http, fake)).status_code == 401
            assert calls, "the first check reads the tenant"
            calls.clear()
            began = time.perf_counter()
            assert (await models(service.http, fake)).status_code == 401
            assert calls == [] and time.perf_counter() - began < 0.05  # no S3 read, no 16 MiB scrypt
            assert (await models(service.http, good)).status_code == 200  # trusted from here on
            for _ in range(3):  # 2 failures so far; the 5th fills the minute's budget
                assert (await models(service.http, new_key("acme")[0])).status_code == 401
            calls.clear()
            refused = await models(service.http, new_key("acme")[0])
            assert refused.status_code == 429 and calls == []
            assert refused.json()["error"]["type"] == "rate_limit_error"
            assert (await models(service.http, good)).status_code == 200  # an already trusted key still works
            other = service.client(host="198.51.100.9")  # another client address is not limited
            assert (await models(other, new_key("acme")[0])).status_code == 401
        finally:
            await service.close()

    asyncio.run(main())


def test_a_key_revoked_over_http_stops_on_every_ingress_replica_within_a_second(store, tmp_path):
    onboard(store, tmp_path, "acme")
    key = store.issue_key("acme")
    spare = store.issue_key("acme")
    admin = store.ensure_admin_key()
    key_id = key.split("_")[2]

    async def main():
        service = await LocalService(store, tmp_path, replicas=3).start()
        try:
            for client in service.clients:  # every replica verifies and then trusts the key (auth_cache_s: 30)
                for _ in range(2):
                    assert (await models(client, key)).status_code == 200
                    await asyncio.sleep(0.05)
            assert all(len(ingress._auth) == 1 for ingress in service.ingresses)
            auth = {"authorization": f"Bearer {admin}"}
            denied = await service.clients[1].delete(f"/v1/admin/tenants/acme/keys/{key_id}",
                                                     headers={"authorization": f"Bearer {spare}"})
            assert denied.status_code == 403
            began = time.perf_counter()
            response = await service.clients[0].delete(f"/v1/admin/tenants/acme/keys/{key_id}", headers=auth)
            assert response.status_code == 200 and response.json()["replicas_told"], response.text
            seconds = {}
            while len(seconds) < 3 and time.perf_counter() - began < 5:
                for i, client in enumerate(service.clients[:3]):
                    if i not in seconds and (await models(client, key)).status_code == 401:
                        seconds[i] = time.perf_counter() - began
                await asyncio.sleep(0.01)
            again = await service.clients[0].delete(f"/v1/admin/tenants/acme/keys/{key_id}", headers=auth)
            assert again.status_code == 404 and again.json()["error"]["code"] == "key_not_found"
            assert (await models(service.clients[2], spare)).status_code == 200  # the tenant's other key works
            return seconds
        finally:
            await service.close()

    seconds = asyncio.run(main())
    assert sorted(seconds) == [0, 1, 2] and max(seconds.values()) < 1.0, seconds
    assert [k.key_id for k in store.list_keys("acme")] == [spare.split("_")[2]]
