"""Chaos (issue 15): real Ray, real SeaweedFS behind a loopback proxy that fails requests and drops
responses after writes succeed, three tenants, a stream of erasures and a stream of chat requests,
coordinator actors and job workers killed while they work, the vLLM engine replica killed once, the
reconciler running. At the end an invariant checker reads the store directly (no proxy): every receipt
terminal and consistent with HEAD and the manifests, HEAD's versions intact, every erased record absent
from the current dataset and every remaining version.

Serving is the real application (``serve.app:build_app``: ingress, one vLLM engine replica, the adapter
board) on the session's Ray head, reading the store through the same faulty proxy, with its switch
notifier registered as the coordinators' publish hook, so every erasure switches the replica. A chat
client sends OpenAI chat completions (each tenant's own key, no retries) round robin for the whole
window. The engine replica is killed once: when the first erasure moved a HEAD (so switches happen on the
killed replica and on its successor) or ``KILL_AT_LATEST_S`` into the chaos, whichever comes first. A chat
may fail only while the engine replica is down: from its kill until Serve reports the restarted replica
running, plus ``KILL_MARGIN_S``; failures outside that window fail the test. Chats must be answered again
after the restart, and once the erasures converged each tenant must be answered by HEAD's adapter. The
``[measure]`` line counts the faults, the chats (answered, failed inside and outside the window), the
engine's downtime and the time to converge.

Not covered here: more than one engine or ingress replica, ingress kills, and streamed (SSE) chats.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import pytest

from cli.demo.clients import ask, wait_ready
from cluster import CoordinatorOptions, RayErasureService, RunnerSpec
from cluster.actors import coordinator_name, stop_coordinator
from cluster.coordinator import retry_at
from tenants.errors import TenantError
from tenants.models import ReceiptStatus
from tenants.store import TenantStore
from tests.cluster.conftest import onboard_local
from tests.cluster.helpers import BASE_NAME, PIPELINE, remove_subject
from tests.cluster.ray_head import free_ports
from tests.cluster.s3_proxy import FaultyS3Proxy

pytestmark = pytest.mark.slow

TENANTS = ("acme", "globex", "initech")
TERMINAL = {ReceiptStatus.published, ReceiptStatus.rejected, ReceiptStatus.failed}

APP = "eraser-chaos"
# What the application reserves of the head's 2 CPUs (its processes use what they need regardless): the rest,
# 1.65, runs two erasure jobs at once at JOB_CPUS each, as the head did before serving shared it.
ENGINE_CPUS, INGRESS_CPUS, JOB_CPUS = 0.25, 0.1, 0.8
# A chat failing up to this long after the restarted replica was reported running still counts as the kill's.
KILL_MARGIN_S = 5.0
ENGINE_BACK_TIMEOUT_S = 240.0
KILL_AT_LATEST_S = 60.0


def start_serving(settings, cache_root) -> str:
    """The serving application on the session's head over the store of ``settings``; returns its URL once
    the ingress answers (the engine may still be loading adapters)."""
    from ray import serve

    from cli.store_args import serve_store_args
    from serve.app import build_app

    (port,) = free_ports(1)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = {
        "app_name": APP,
        "engine": {"model": BASE_NAME, "max_model_len": 128, "max_loras": 3, "max_cpu_loras": 6, "max_lora_rank": 8,
                   "max_num_seqs": 8},
        "store": {**serve_store_args(settings), "cache_dir": str(cache_root / "replica-cache")},
        "adapter_dir": str(cache_root / "replica-adapters"),
        "refresh_interval_s": 2.0,
        "switch_timeout_s": 30.0,  # a publish waits this long for a replica that was killed (the board's timeout)
        "engine_num_cpus": ENGINE_CPUS,
        "ingress_num_cpus": INGRESS_CPUS,
    }
    serve.run(build_app(config), name=APP, route_prefix="/", blocking=False)
    base_url = f"http://127.0.0.1:{port}"
    wait_ready(base_url, timeout_s=240.0)
    return base_url


@dataclass
class Chat:
    tenant: str
    started: float  # time.monotonic()
    ended: float
    error: str | None  # None: answered


class ChatLoad:
    """Chat completions round robin over the tenants (each with its own key, no retries) until stopped,
    recording every request's start, end and outcome."""

    def __init__(self, base_url: str, keys: dict[str, str], questions: dict[str, list[str]],
                 pause_s: float = 0.25) -> None:
        from openai import OpenAI

        self.clients = {t: OpenAI(base_url=f"{base_url}/v1", api_key=k, max_retries=0, timeout=120.0)
                        for t, k in keys.items()}
        self.questions, self.pause_s = questions, pause_s
        self.chats: list[Chat] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="chaos-chats", daemon=True)

    def _run(self) -> None:
        turn = 0
        while not self.stop.wait(self.pause_s):
            tenant = list(self.clients)[turn % len(self.clients)]
            question = self.questions[tenant][turn // len(self.clients) % len(self.questions[tenant])]
            self.chats.append(self.chat(tenant, question))
            turn += 1

    def chat(self, tenant: str, question: str) -> Chat:
        started = time.monotonic()
        try:
            ask(self.clients[tenant], tenant, [{"role": "user", "content": question}], max_tokens=8)
            error = None
        except Exception as failure:  # noqa: BLE001 (every failure is recorded and judged against the kill windows)
            error = f"{type(failure).__name__}: {failure}"
        return Chat(tenant, started, time.monotonic(), error)

    def start(self) -> "ChatLoad":
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self.thread.join(150)


def engine_replicas() -> list[str]:
    """Names of the application's live engine replica actors (namespace ``serve``)."""
    from ray.util.state import list_actors

    prefix = f"SERVE_REPLICA::{APP}#EngineServer#"
    return [a.name for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
            if (a.name or "").startswith(prefix)]


def engine_running() -> int:
    """Engine replicas Serve reports RUNNING."""
    from ray import serve

    status = serve.status().applications.get(APP)
    engine = status.deployments.get("EngineServer") if status is not None else None
    return dict(engine.replica_states or {}).get("RUNNING", 0) if engine is not None else 0


def kill_engine_replica(when: Callable[[], bool], give_up: threading.Event, kills: list[dict]) -> None:
    """Once ``when()`` holds, kill the engine replica (Serve starts another) and record the kill's time and
    the time the new replica runs: ``kills`` gets ``{"killed", "back", "replica"}`` (monotonic; back None
    if it was not back within ``ENGINE_BACK_TIMEOUT_S``)."""
    import ray

    while not when():
        if give_up.wait(1.0):
            return
    (name,) = engine_replicas()
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=False)
    kill = {"killed": time.monotonic(), "back": None, "replica": name}
    kills.append(kill)
    deadline = kill["killed"] + ENGINE_BACK_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if engine_running() == 1 and engine_replicas() not in ([], [name]):
                kill["back"] = time.monotonic()
                return
        except Exception:  # noqa: BLE001 (the state API can time out on a busy head: ask again)
            pass
        time.sleep(0.5)


def in_a_kill_window(chat: Chat, kills: list[dict]) -> bool:
    """Whether a chat ended between an engine kill and ``KILL_MARGIN_S`` after its replica was back."""
    return any(k["killed"] <= chat.ended <= (k["back"] or float("inf")) + KILL_MARGIN_S for k in kills)


def served_adapter(base_url: str, key: str, tenant: str, question: str) -> str:
    """The adapter that answered one chat (the ``x-eraser-adapter`` header: ``<tenant>@<version>``)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=60.0)
    raw = client.chat.completions.with_raw_response.create(
        model=tenant, messages=[{"role": "user", "content": question}], max_tokens=4, temperature=0)
    return raw.headers["x-eraser-adapter"]


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


def first_answers(load: ChatLoad, timeout_s: float = 240.0) -> None:
    """Wait until every tenant got an answer (the engine started and loaded its adapter)."""
    deadline = time.monotonic() + timeout_s
    for tenant, questions in load.questions.items():
        while (chat := load.chat(tenant, questions[0])).error is not None:
            assert time.monotonic() < deadline, f"{tenant} not answered in {timeout_s:.0f}s: {chat.error}"
            time.sleep(2.0)


def wait_served_at_head(base_url: str, store: TenantStore, keys: dict[str, str], questions: dict[str, list[str]],
                        timeout_s: float = 60.0) -> dict[str, tuple[str, str]]:
    """Until every tenant is answered by HEAD's adapter (or the timeout): tenant -> (served, HEAD's)."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen = {}
        for tenant, key in keys.items():
            try:
                served = served_adapter(base_url, key, tenant, questions[tenant][0])
            except Exception as error:  # noqa: BLE001 (shown in the assertion)
                served = f"{type(error).__name__}: {error}"
            seen[tenant] = (served, f"{tenant}@{store.get_head(tenant)[0].adapter}")
        if all(a == b for a, b in seen.values()) or time.monotonic() > deadline:
            return seen
        time.sleep(2.0)


def test_chaos_every_receipt_true_after_faults(ray_cluster, grace0_settings, tiny_base, namespace, tmp_path, capsys):
    import ray
    from ray import serve

    from serve.board import SwitchNotifier

    started = time.monotonic()
    store, records = onboard_local(grace0_settings, tiny_base, tenants=TENANTS)
    keys = {tenant: store.issue_key(tenant, "chaos") for tenant in TENANTS}
    questions = {tenant: [r.prompt for r in records[tenant][:4]] for tenant in TENANTS}
    proxy = FaultyS3Proxy(grace0_settings.endpoint, fail=0.03, drop=0.03, seed=15).start()
    faulty = grace0_settings.model_copy(update={"endpoint": proxy.endpoint})
    options = CoordinatorOptions(pipeline=PIPELINE, purge_grace_seconds=0, warm_curvature=False, lease_ttl_s=4.0,
                                 lease_wait_s=6.0, max_attempts=4, retry_backoff_s=1.0, retry_backoff_max_s=4.0)
    beats = tmp_path / "heartbeats"
    runner = RunnerSpec(num_workers=1, max_failures=1, job_timeout_s=240, cpus_per_worker=JOB_CPUS)
    service = RayErasureService(faulty, runner, options, namespace=namespace, heartbeat_dir=str(beats))
    stream = []
    for tenant in TENANTS:
        stream += [remove_subject(tenant, f"{tenant}-1", records[tenant], 0),
                   remove_subject(tenant, f"{tenant}-2", records[tenant], 1),
                   {"request_id": f"{tenant}-bad", "tenant": tenant, "kind": "remove", "records": ["no-such-record"]}]
    random.Random(15).shuffle(stream)
    faults = {"coordinator_kills": 0, "worker_kills": 0, "submit_errors": 0}
    engine_kills: list[dict] = []
    stop = threading.Event()  # the end of the chaos window (the engine kill and the chats go on until the end)
    test_over = threading.Event()

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

    def first_switch() -> bool:  # the engine dies once an erasure moved a HEAD (switches before and after the
        # kill), or KILL_AT_LATEST_S into the chaos (the window lasts until the kill: this bounds the test's time)
        late = chaos_started is not None and time.monotonic() > chaos_started + KILL_AT_LATEST_S
        return late or any(store.get_head(t)[0].adapter != "v000001" for t in TENANTS)

    engine_killer = threading.Thread(target=kill_engine_replica, args=(first_switch, test_over, engine_kills),
                                     daemon=True)
    chats = reconciler = chaos_started = None
    try:
        base_url = start_serving(faulty, tmp_path)
        service.register_publish_hook(f"serve:{APP}", SwitchNotifier(APP, timeout_s=30.0))
        chats = ChatLoad(base_url, keys, questions)
        first_answers(chats)
        serving_ready = time.monotonic()
        reconciler = service.start_reconciler(interval_s=3.0)
        chats.start()
        chaos_started = time.monotonic()
        killer.start()
        engine_killer.start()
        for request in stream:  # a client that retries until its request is recorded (idempotent by id)
            for _ in range(20):
                try:
                    service.submit(request)
                    break
                except Exception:  # noqa: BLE001 (an actor being restarted, S3 faults past botocore's retries)
                    faults["submit_errors"] += 1
                    time.sleep(1.0)
            time.sleep(2.0)
        time.sleep(20.0)  # the chaos goes on a while after the last request, and until the engine was killed
        while not engine_kills and engine_killer.is_alive() and time.monotonic() < chaos_started + 240:
            time.sleep(1.0)
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
        engine_killer.join(ENGINE_BACK_TIMEOUT_S)
        served = wait_served_at_head(base_url, store, keys, questions)
    finally:
        stop.set()
        test_over.set()
        if chats is not None:
            chats.close()
        if reconciler is not None:
            reconciler.stop()
        # Serve itself goes too (controller and HTTP proxy), not only the app: while Serve runs, a later
        # serve.start ignores its http_options, so tests/serve's application would listen on this port.
        serve.shutdown()
        proxy_counts = dict(proxy.counts)
        proxy.stop()
        for tenant in TENANTS:
            stop_coordinator(tenant, namespace)

    problems = [p for t in TENANTS for p in check_invariants(store, t, options)]
    receipts = [r for t in TENANTS for r in store.list_receipts(t)]
    by_status = {s.value: sum(r.status == s for r in receipts) for s in ReceiptStatus}
    attempts = sum(len(r.attempts) for r in receipts)
    failed = [c for c in chats.chats if c.error is not None]
    outside = [c for c in failed if not in_a_kill_window(c, engine_kills)]
    back = engine_kills[0]["back"] if engine_kills else None
    answered_after = sum(c.error is None and back is not None and c.started > back for c in chats.chats)
    reasons = Counter(c.error.split(":")[0] for c in failed)
    longest = max((c.ended - c.started for c in chats.chats), default=0.0)  # a chat that waited out the restart
    switched = sum(r.replicas_switched_at is not None for r in receipts if r.status == ReceiptStatus.published)
    downtime = "none" if not engine_kills else (
        f"{engine_kills[0]['killed'] - chaos_started:.0f}s into the chaos, down "
        + (f"{back - engine_kills[0]['killed']:.0f}s" if back is not None else "and never back"))
    with capsys.disabled():
        print(f"\n[measure] chaos: {len(stream)} requests over {len(TENANTS)} tenants; injected: S3 "
              f"{proxy_counts['failed']} failed + {proxy_counts['dropped']} dropped responses of "
              f"{proxy_counts['requests']} requests, {faults['coordinator_kills']} coordinator kills, "
              f"{faults['worker_kills']} job-worker kills, {len(engine_kills)} engine-replica kill ({downtime}); "
              f"{faults['submit_errors']} submit errors retried by the client; receipts {by_status}, {attempts} "
              f"failed attempts recorded, {switched} switches confirmed by the serving hook, {reconciler.passes} "
              f"reconciler passes ({len(reconciler.runs)} rounds started); chats {len(chats.chats)} sent, "
              f"{len(chats.chats) - len(failed)} answered ({answered_after} after the restart; longest "
              f"{longest:.0f}s), {len(failed)} failed ({len(failed) - len(outside)} in the engine kill's window, "
              f"{len(outside)} outside: {dict(reasons)}); "
              f"serving ready {serving_ready - started:.0f}s in; converged {converged - chaos_over:.0f}s after the "
              f"chaos ended, {converged - started:.0f}s in all")
    assert not problems, problems
    assert len(receipts) == len(stream)
    assert by_status["rejected"] == len(TENANTS)  # the invalid ones, and only they
    assert by_status["published"] + by_status["failed"] == 2 * len(TENANTS)
    assert proxy_counts["failed"] + proxy_counts["dropped"] > 0 and faults["coordinator_kills"] > 0
    assert engine_kills, "the engine replica was never killed (no HEAD moved?)"
    assert back is not None, f"the engine replica was not back {ENGINE_BACK_TIMEOUT_S:.0f}s after its kill"
    assert not outside, [(c.tenant, round(c.started - started, 1), round(c.ended - started, 1), c.error)
                         for c in outside[:5]]
    assert answered_after > 0
    assert all(a == b for a, b in served.values()), served  # tenant: (answered by, HEAD's adapter)
