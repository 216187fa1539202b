"""The HTTP receipt route shows whether an erasure is complete and what was checked (the real ingress
in process, store on SeaweedFS; the erasure run by a coordinator with the fake job runner)."""

from __future__ import annotations

import asyncio

from cluster import CoordinatorOptions, ErasureCoordinator
from tests.cluster.test_faults import FakeRunner
from tests.serve.local_ingress import LocalService
from tests.tenants.helpers import onboard


def test_the_receipt_route_shows_completed_at_and_each_check(store, tmp_path):
    onboard(store, tmp_path, "acme")
    key = store.issue_key("acme")
    options = CoordinatorOptions(purge_grace_seconds=0, warm_curvature=False)
    core = ErasureCoordinator("acme", store, FakeRunner(tmp_path), options)
    core.submit({"request_id": "req-1", "tenant": "acme", "kind": "remove", "records": ["r1"]})
    core.run_until_idle()

    async def main():
        service = await LocalService(store, tmp_path).start()
        try:
            return await service.http.get("/v1/tenants/acme/erasures/req-1", headers={"authorization": f"Bearer {key}"})
        finally:
            await service.close()

    response = asyncio.run(main())
    assert response.status_code == 200, response.text
    receipt = response.json()
    assert receipt["status"] == "published" and receipt["completed_at"] == receipt["completion"]["checked_at"]
    assert {name: check["ok"] for name, check in receipt["completion"].items() if name != "checked_at"} == {
        "records_gone": True, "versions_purged": True, "replicas_switched": True}
