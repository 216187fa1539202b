"""Chaos (issue 15): real Ray, real SeaweedFS behind a loopback proxy that fails requests and drops
responses after writes succeed, three tenants, a stream of erasures, coordinator actors and job
workers killed while they work, the reconciler running. At the end an invariant checker reads the
store directly (no proxy): every receipt terminal and consistent with HEAD and the manifests, HEAD's
versions intact, every erased record absent from the current dataset and every remaining version.

Not covered here (said plainly): chat requests and engine-replica kills (serving is not started).
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from dataclasses import replace

import pytest

from cluster import CoordinatorOptions, RayErasureService, RunnerSpec
from cluster.actors import coordinator_name, stop_coordinator
from cluster.coordinator import retry_at
from tenants.errors import TenantError
from tenants.models import ReceiptStatus
from tenants.store import TenantStore
from tests.cluster.conftest import onboard_local
from tests.cluster.helpers import PIPELINE, remove_subject
from tests.cluster.s3_proxy import FaultyS3Proxy

pytestmark = pytest.mark.slow

TENANTS = ("acme", "globex", "initech")
TERMINAL = {ReceiptStatus.published, ReceiptStatus.rejected, ReceiptStatus.failed}


def check_invariants(store: TenantStore, tenant: str, options: CoordinatorOptions) -> list[str]:
    """What is wrong with ``tenant``'s ledger, HEAD and versions (empty: nothing)."""
    problems = []
    head, _ = store.get_head(tenant)
    receipts = store.list_receipts(tenant)
    adapters = {v: store.get_adapter_manifest(tenant, v) for v in store.list_adapter_versions(tenant)}
    datasets = store.list_data_versions(tenant)
    if head is None or head.adapter not in adapters or head.data not in datasets:
        return [f"{tenant}: HEAD {head} names a missing version"]
    try:
        store.download_adapter(tenant, head.adapter)  # every file against its sha256
        current = {r.id for r in store.read_dataset(tenant, head.data)}
    except TenantError as error:
        return [f"{tenant}: HEAD's versions unreadable: {error}"]
    erased: set[str] = set()
    number = lambda v: int(v[1:])  # noqa: E731
    for receipt in receipts:
        where = f"{tenant}/{receipt.request_id}"
        if receipt.status not in TERMINAL:
            problems.append(f"{where}: not terminal ({receipt.status.value})")
        if receipt.status == ReceiptStatus.failed and retry_at(receipt, options) is not None:
            problems.append(f"{where}: failed with retries left ({len(receipt.attempts)} attempts)")
        if receipt.status == ReceiptStatus.published:
            erased |= set(receipt.records_affected)
            version = receipt.new_adapter_version
            if version is None or number(version) > number(head.adapter):
                problems.append(f"{where}: published as {version}, HEAD is {head.adapter}")
            elif version in adapters and receipt.request_id not in adapters[version].request_ids:
                problems.append(f"{where}: {version}'s manifest does not name it")
            if not receipt.records_affected:
                problems.append(f"{where}: published with no records affected")
    if erased & current:
        problems.append(f"{tenant}: erased records in HEAD's dataset: {sorted(erased & current)}")
    for version in datasets:
        left = erased & {r.id for r in store.read_dataset(tenant, version)}
        if left:
            problems.append(f"{tenant}: data version {version} still holds erased records {sorted(left)}")
    for version, manifest in adapters.items():
        if version != head.adapter and manifest.data_version not in datasets:
            problems.append(f"{tenant}: adapter {version} outlived its data version {manifest.data_version}")
    return problems


def test_chaos_every_receipt_true_after_faults(ray_cluster, grace0_settings, tiny_base, namespace, tmp_path, capsys):
    import ray

    started = time.monotonic()
    store, records = onboard_local(grace0_settings, tiny_base, tenants=TENANTS)
    proxy = FaultyS3Proxy(grace0_settings.endpoint, fail=0.03, drop=0.03, seed=15).start()
    faulty = grace0_settings.model_copy(update={"endpoint": proxy.endpoint})
    options = CoordinatorOptions(pipeline=PIPELINE, purge_grace_seconds=0, warm_curvature=False, lease_ttl_s=4.0,
                                 lease_wait_s=6.0, max_attempts=4, retry_backoff_s=1.0, retry_backoff_max_s=4.0)
    beats = tmp_path / "heartbeats"
    service = RayErasureService(faulty, RunnerSpec(num_workers=1, max_failures=1, job_timeout_s=240), options,
                                namespace=namespace, heartbeat_dir=str(beats))
    reconciler = service.start_reconciler(interval_s=3.0)
    stream = []
    for tenant in TENANTS:
        stream += [remove_subject(tenant, f"{tenant}-1", records[tenant], 0),
                   remove_subject(tenant, f"{tenant}-2", records[tenant], 1),
                   {"request_id": f"{tenant}-bad", "tenant": tenant, "kind": "remove", "records": ["no-such-record"]}]
    random.Random(15).shuffle(stream)
    faults = {"coordinator_kills": 0, "worker_kills": 0, "submit_errors": 0}
    stop = threading.Event()

    def chaos() -> None:
        rng = random.Random(15)
        kills = {t: 0 for t in TENANTS}
        while not stop.wait(5.0):
            killable = [t for t in TENANTS if kills[t] < 2]  # an actor restarts 3 times at most
            if killable and rng.random() < 0.5:
                tenant = rng.choice(killable)
                try:
                    ray.kill(ray.get_actor(coordinator_name(tenant), namespace=namespace), no_restart=False)
                    kills[tenant] += 1
                    faults["coordinator_kills"] += 1
                except ValueError:
                    pass
            else:
                try:
                    beat = json.loads((beats / "rank-0.json").read_text())
                except (OSError, ValueError):
                    continue
                if beat.get("stage") != "done" and time.time() - beat.get("time", 0) < 3:
                    try:
                        os.kill(beat["pid"], signal.SIGKILL)
                        faults["worker_kills"] += 1
                    except ProcessLookupError:
                        pass

    killer = threading.Thread(target=chaos, daemon=True)
    try:
        killer.start()
        for request in stream:  # a client that retries until its request is recorded (idempotent by id)
            for _ in range(20):
                try:
                    service.submit(request)
                    break
                except Exception:  # noqa: BLE001 (an actor being restarted, S3 faults past botocore's retries)
                    faults["submit_errors"] += 1
                    time.sleep(1.0)
            time.sleep(2.0)
        time.sleep(20.0)  # the chaos goes on a while after the last request
        stop.set()
        killer.join(10)
        chaos_over = time.monotonic()
        deadline = chaos_over + 420
        while time.monotonic() < deadline:
            receipts = [r for t in TENANTS for r in store.list_receipts(t)]
            open_ = [r for r in receipts if r.status not in TERMINAL or retry_at(r, options) is not None]
            superseded = [t for t in TENANTS if len(store.list_adapter_versions(t)) > 1]
            if len(receipts) == len(stream) and not open_ and not superseded:
                break
            time.sleep(2.0)
        converged = time.monotonic()
    finally:
        stop.set()
        reconciler.stop()
        proxy_counts = dict(proxy.counts)
        proxy.stop()
        for tenant in TENANTS:
            stop_coordinator(tenant, namespace)

    problems = [p for t in TENANTS for p in check_invariants(store, t, options)]
    receipts = [r for t in TENANTS for r in store.list_receipts(t)]
    by_status = {s.value: sum(r.status == s for r in receipts) for s in ReceiptStatus}
    attempts = sum(len(r.attempts) for r in receipts)
    with capsys.disabled():
        print(f"\n[measure] chaos: {len(stream)} requests over {len(TENANTS)} tenants; injected: S3 "
              f"{proxy_counts['failed']} failed + {proxy_counts['dropped']} dropped responses of "
              f"{proxy_counts['requests']} requests, {faults['coordinator_kills']} coordinator kills, "
              f"{faults['worker_kills']} job-worker kills; {faults['submit_errors']} submit errors retried by the "
              f"client; receipts {by_status}, {attempts} failed attempts recorded, {reconciler.passes} reconciler "
              f"passes ({len(reconciler.runs)} rounds started); converged {converged - chaos_over:.0f}s after the "
              f"chaos ended, {converged - started:.0f}s in all")
    assert not problems, problems
    assert len(receipts) == len(stream)
    assert by_status["rejected"] == len(TENANTS)  # the invalid ones, and only they
    assert by_status["published"] + by_status["failed"] == 2 * len(TENANTS)
    assert proxy_counts["failed"] + proxy_counts["dropped"] > 0 and faults["coordinator_kills"] > 0
