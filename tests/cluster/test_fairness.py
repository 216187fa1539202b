"""Fairness of erasure jobs across tenants (issue 16): a coordinator keeps at most one job of its tenant
in flight, so a tenant that floods the service with erasures holds one place in the cluster's queue,
not one per request, and another tenant's erasure waits for at most the job already running.

The cluster is a fake with one worker slot granted first come first served (Ray queues tasks of one
resource shape in submission order, up to its scheduler's batching); the coordinators, the store
(real SeaweedFS) and the receipts are the product's. What it measures: how many of the flooding
tenant's jobs start between the victim's request and the victim's job."""

from __future__ import annotations

import collections
import threading
import time

import pytest

from cluster import CoordinatorOptions, LocalErasureService
from tests.cluster.test_faults import FakeRunner
from tests.tenants.helpers import onboard

pytestmark = pytest.mark.slow

FLOOD = 10  # erasures the flooding tenant sends at once, one record each
JOB_S = 0.3  # how long a job holds the slot: long enough for the victim's round to queue behind it


class OneSlotCluster(FakeRunner):
    """Every tenant's jobs share one worker slot, granted in the order they asked for it."""

    def __init__(self, root) -> None:
        super().__init__(root)
        self._turns = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self.started: list[str] = []  # tenant of each job, in the order the slot was granted

    def run_erasure_job(self, job):
        turn = object()
        with self._turns:
            self._queue.append(turn)
            self._turns.wait_for(lambda: self._queue[0] is turn)
        try:
            self.started.append(job.tenant)
            time.sleep(JOB_S)
            return super().run_erasure_job(job)
        finally:
            with self._turns:
                self._queue.popleft()
                self._turns.notify_all()


def test_a_flooding_tenant_holds_one_place_in_the_queue_not_one_per_request(store, tmp_path, capsys):
    onboard(store, tmp_path, "flood", n=FLOOD)
    onboard(store, tmp_path, "victim", n=2)
    cluster = OneSlotCluster(tmp_path)
    options = CoordinatorOptions(purge_grace_seconds=0, warm_curvature=False, max_batch=1)  # worst case: a job each
    service = LocalErasureService(store.settings, cluster, options)
    for i in range(FLOOD):
        service.submit({"request_id": f"flood-{i}", "tenant": "flood", "kind": "remove", "records": [f"r{i}"]})
    flooding = threading.Thread(target=service.process, args=(["flood"],))
    flooding.start()
    assert cluster.entered.wait(30), "the flooding tenant's first job never started"
    asked = time.monotonic()
    service.submit({"request_id": "victim-1", "tenant": "victim", "kind": "remove", "records": ["r0"]})
    service.process(["victim"])
    victim_s = time.monotonic() - asked
    flooding.join(120)
    assert not flooding.is_alive()

    ahead = cluster.started.index("victim")  # flood jobs granted the slot before the victim's
    with capsys.disabled():
        print(f"\n[measure] fairness: victim's job started after {ahead} of the flooding tenant's {FLOOD} jobs "
              f"(one holds {JOB_S:.1f} s of the only slot); victim's request to published {victim_s:.1f} s")
    assert cluster.started.count("flood") == FLOOD and cluster.started.count("victim") == 1
    assert ahead <= 2, cluster.started  # the running job, and at most one that asked before the victim did
    assert [r.status.value for r in store.list_receipts("victim")] == ["published"]
