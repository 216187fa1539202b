"""Two engine replicas behind the ingress (issue 17, item 2), against the real application.

A second Serve application (``/pair``, its own store prefix, adapter directory and board) runs next to
the package's ``served`` on the session's 2-CPU Ray head: two vLLM CPU engines at 0.2 logical CPU
each and an ingress at 0.05 (``served`` holds 1.5). It reuses ``served``'s base model and trained
adapters: tenant ``gamma``'s versions 1, 2 and 3 are the files of ``acme@v1``, ``acme@v2`` and
``beta@v1``, so each version answers differently and is checked against its HF/PEFT greedy answer.
HEAD polling is off (``refresh_interval_s`` 0): only the board's notice, or a replica's first request
(which reads HEAD from S3), can make a replica serve a new version.

Each replica is told apart by its Serve replica id: the engine yields it with the adapter's name on
every request (asked here through the engine's deployment handle, which spreads requests at random
over the replicas), and :meth:`EngineServer.inspect` reports it with the replica's adapter directory.

The tests run in order on one deployment: 2 replicas and a switch; down to 1 (the removed replica's
files go with it); HEAD moved, then up to 2 (the new replica serves the new HEAD from its first
request); a second tenant, ``delta`` (its one version: the files of ``acme@v1``), whose requests through
the ingress all go to the one replica that loaded its adapter (Serve's multiplexing: serve.routing),
until that replica is full (``max_ongoing_requests``, set to 1 in place) and the other takes the rest.
Scaling changes only ``num_replicas``: the deployments get a fixed version (as a Serve config file's
deploy would), so Serve adds or removes one replica instead of restarting them all.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict
from pathlib import Path

import httpx
import pytest

from serve.board import SwitchNotifier
from tests.serve import models

pytestmark = pytest.mark.slow

NAME = "eraser-pair"
ROUTE = "/pair"
TENANT = "gamma"
FILES = {"v1": "acme@v1", "v2": "acme@v2", "v3": "beta@v1"}  # gamma's versions: served's adapter files
OTHER, OTHER_FILES = "delta", "acme@v1"  # a second tenant, onboarded but not asked before the routing test
MAX_TOKENS = 8
QUESTION = models.QUESTIONS[2]
DEPLOY_TIMEOUT_S = 300.0


class Pair:
    """The two-replica application: its config, store, versions, and ways to reach each replica."""

    def __init__(self, served, store, config: dict, keys: dict[str, str], data: str, root: Path) -> None:
        self.served, self.store, self.config, self.keys, self.data, self.root = served, store, config, keys, data, root
        self.url = f"{served.base_url}{ROUTE}"
        self.versions: dict[str, str] = {}  # "v1" -> store version
        self.prompt = models.chat_ids(served.base_dir, QUESTION)

    @property
    def adapter_root(self) -> Path:
        return Path(self.config["adapter_dir"])

    def publish(self, label: str) -> str:
        """Publish the label's adapter files as gamma's next version and move HEAD to it (no notice)."""
        from tenants.models import AdapterManifest, Head

        version = self.store.publish_adapter(TENANT, self.served.adapters[FILES[label]],
                                             AdapterManifest(data_version=self.data, path="retrain"))
        self.versions[label] = version
        _, etag = self.store.get_head(TENANT)
        self.store.move_head(TENANT, Head(adapter=version, data=self.data), etag)
        return version

    def expected(self, label: str) -> str:
        return self.served.reference(FILES[label], self.prompt, MAX_TOKENS)

    def deploy(self, replicas: int, **fields) -> None:
        """(Re)deploy with ``replicas`` engines (and other config ``fields``); wait until exactly that many run
        and none is stopping."""
        from ray import serve

        serve.run(build(dict(self.config, engine_replicas=replicas, **fields)), name=NAME, route_prefix=ROUTE,
                  blocking=False)
        deadline = time.monotonic() + DEPLOY_TIMEOUT_S
        while time.monotonic() < deadline:
            status = serve.status().applications.get(NAME)
            engine = status.deployments.get("EngineServer") if status is not None else None
            states = dict(engine.replica_states or {}) if engine is not None else {}
            if status is not None and status.status == "RUNNING" and states == {"RUNNING": replicas}:
                try:
                    if httpx.get(f"{self.url}/healthz", timeout=10).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(1.0)
        raise TimeoutError(f"{NAME} did not run exactly {replicas} engine replica(s) in {DEPLOY_TIMEOUT_S:.0f}s: {states}")

    def engine(self):
        from ray import serve

        return serve.get_deployment_handle("EngineServer", app_name=NAME)

    def ask_engine(self) -> tuple[str, str, str]:
        """One generation through the engine's handle: (replica id, adapter name, text)."""
        from serve.engine import SamplingOptions

        job = {"tenant": TENANT, "request_id": f"pair-{uuid.uuid4().hex[:8]}", "prompt": self.prompt,
               "options": asdict(SamplingOptions(max_tokens=MAX_TOKENS, temperature=0.0))}
        items = list(self.engine().options(stream=True).generate.remote(job))
        assert "error" not in items[0], items[0]
        return items[0]["replica"], items[0]["adapter"], "".join(i["chunk"]["text"] for i in items[1:])

    def answers_per_replica(self, replicas: int, tries: int = 60) -> dict[str, list[tuple[str, str]]]:
        """Generations until ``replicas`` distinct replicas answered (at most ``tries``): replica -> answers
        in order; fails if more replicas answer or fewer do."""
        seen: dict[str, list[tuple[str, str]]] = {}
        for _ in range(tries):
            replica, adapter, text = self.ask_engine()
            seen.setdefault(replica, []).append((adapter, text))
            if len(seen) == replicas and min(len(a) for a in seen.values()) >= 2:
                break
        assert len(seen) == replicas, {r: a[:2] for r, a in seen.items()}
        return seen

    def inspect_each(self, replicas: int, tries: int = 60) -> dict[str, dict]:
        """Each replica's own view (:meth:`EngineServer.inspect`), by replica id."""
        seen: dict[str, dict] = {}
        for _ in range(tries):
            view = self.engine().inspect.remote().result(timeout_s=60)
            seen[view["replica"]] = view
            if len(seen) == replicas:
                break
        assert len(seen) == replicas, sorted(seen)
        return seen

    def ask_http(self, n: int, tenant: str = TENANT) -> list[tuple[str, str]]:
        """``n`` completions through the ingress, one after the other: (x-eraser-adapter, text) each."""
        answers = []
        for _ in range(n):
            response = httpx.post(f"{self.url}/v1/completions",
                                  headers={"Authorization": f"Bearer {self.keys[tenant]}"},
                                  json={"model": tenant, "prompt": self.prompt, "max_tokens": MAX_TOKENS,
                                        "temperature": 0}, timeout=60)
            assert response.status_code == 200, response.text
            answers.append((response.headers["x-eraser-adapter"], response.json()["choices"][0]["text"]))
        return answers

    def board(self) -> dict:
        from ray import serve

        return serve.get_deployment_handle("AdapterBoard", app_name=NAME).status.remote().result(timeout_s=30)


def build(config: dict):
    """``serve.app.build_app(config)`` with every deployment at a fixed version, so a redeploy that only
    changes ``engine_replicas`` scales the engines instead of replacing every replica."""
    from unittest import mock

    import serve.app as serve_app

    real = serve_app.serve.deployment

    def versioned(*args, **kwargs):
        return real(*args, **kwargs).options(version="pair-1", _internal=True)

    with mock.patch.object(serve_app.serve, "deployment", versioned):
        return serve_app.build_app(config)


@pytest.fixture(scope="module")
def pair(served, s3_server, s3_bucket, tmp_path_factory):
    from ray import serve

    from tenants.models import AdapterManifest, Head, TenantConfig
    from tenants.store import TenantStore

    root = tmp_path_factory.mktemp("pair")
    settings = s3_server.settings(bucket=s3_bucket, prefix=f"pair-{uuid.uuid4().hex[:8]}", cache_dir=root / "cache")
    store = TenantStore(settings)
    store.put_model("tiny", served.base_dir)
    store.create_tenant(TenantConfig(name=TENANT, base_model="tiny"))
    keys = {TENANT: store.issue_key(TENANT, "tests")}
    data = store.put_dataset(TENANT, [r.to_json() for r in models.tenant_records("alpha")])
    store.create_tenant(TenantConfig(name=OTHER, base_model="tiny"))
    keys[OTHER] = store.issue_key(OTHER, "tests")
    other_data = store.put_dataset(OTHER, [r.to_json() for r in models.tenant_records("alpha")])
    other = store.publish_adapter(OTHER, served.adapters[OTHER_FILES],
                                  AdapterManifest(data_version=other_data, path="train"))
    store.move_head(OTHER, Head(adapter=other, data=other_data), None)
    config = dict(
        served.config, app_name=NAME, engine_replicas=2, engine_num_cpus=0.2, ingress_num_cpus=0.05,
        refresh_interval_s=0.0, adapter_dir=str(root / "adapters"),
        store={**served.config["store"], "prefix": settings.prefix, "cache_dir": str(root / "replica-cache")},
    )
    pair = Pair(served, store, config, keys, data, root)
    pair.publish("v1")
    assert store.get_head(TENANT)[0].adapter == pair.versions["v1"]
    try:
        pair.deploy(2)
        yield pair
    finally:
        serve.delete(NAME)


def test_a_switch_reaches_both_replicas(pair):
    v1_name = f"{TENANT}@{pair.versions['v1']}"
    answers = pair.answers_per_replica(2)  # each replica loads v1 (HEAD) on its first request
    for replica, found in answers.items():
        assert found == [(v1_name, pair.expected("v1"))] * len(found), (replica, found)
    assert set(pair.ask_http(4)) == {(v1_name, pair.expected("v1"))}
    replicas = set(answers)
    assert set(pair.board()["replicas"]) == replicas

    v2 = pair.publish("v2")
    report = SwitchNotifier(NAME, timeout_s=90)(TENANT, v2)
    assert report is not None and report["complete"], report
    assert set(report["replicas"]) == replicas, report
    for replica, event in report["replicas"].items():
        assert (event["old_version"], event["new_version"]) == (pair.versions["v1"], v2), event
        assert event["dropped_at"] is not None and event["dropped_at"] >= event["serving_at"], event

    v2_name = f"{TENANT}@{v2}"
    assert pair.expected("v2") != pair.expected("v1")
    after = pair.answers_per_replica(2)
    assert set(after) == replicas
    for replica, found in after.items():
        assert found == [(v2_name, pair.expected("v2"))] * len(found), (replica, found)
    assert set(pair.ask_http(4)) == {(v2_name, pair.expected("v2"))}
    for replica, view in pair.inspect_each(2).items():
        assert view["current"][TENANT]["version"] == v2, (replica, view["current"])
        assert view["retired"] == [], (replica, view["retired"])
        assert f"tenants/{TENANT}/adapters/{pair.versions['v1']}" not in view["adapter_files"], view
        assert f"tenants/{TENANT}/adapters/{v2}" in view["adapter_files"], view


def test_a_replica_removed_by_downscaling_takes_its_adapter_files(pair):
    views = pair.inspect_each(2)
    dirs = {replica: Path(view["adapter_dir"]) for replica, view in views.items()}
    for replica, path in dirs.items():
        assert path.parent == pair.adapter_root and path.name == replica, path
        assert any(path.rglob("adapter_model.safetensors")), f"replica {replica} holds no adapter files: {path}"
        assert (pair.adapter_root / f"{replica}.lock").exists()

    pair.deploy(1)  # same version: Serve stops one replica, keeps the other
    survivor, = pair.inspect_each(1)
    assert survivor in dirs, f"Serve replaced the replicas instead of removing one: {survivor} not in {sorted(dirs)}"
    removed, = set(dirs) - {survivor}
    deadline = time.monotonic() + 60
    while dirs[removed].exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not dirs[removed].exists(), f"removed replica {removed} left {sorted(dirs[removed].rglob('*'))}"
    assert not (pair.adapter_root / f"{removed}.lock").exists()
    assert sorted(p.name for p in pair.adapter_root.iterdir()) == sorted([survivor, f"{survivor}.lock"])
    assert any(dirs[survivor].rglob("adapter_model.safetensors"))  # the survivor keeps its own
    assert pair.board()["replicas"] == [survivor]  # it left the board on its way out
    v2_name = f"{TENANT}@{pair.versions['v2']}"
    assert set(pair.ask_http(3)) == {(v2_name, pair.expected("v2"))}


def test_a_replica_started_after_a_publish_serves_the_new_head(pair):
    before = set(pair.inspect_each(1))
    v3 = pair.publish("v3")
    report = SwitchNotifier(NAME, timeout_s=90)(TENANT, v3)
    assert report is not None and report["complete"] and set(report["replicas"]) == before, report
    v3_name = f"{TENANT}@{v3}"
    assert pair.expected("v3") not in (pair.expected("v1"), pair.expected("v2"))

    pair.deploy(2)  # a new replica: it never heard the notice, its board watch starts after it
    answers = pair.answers_per_replica(2)
    new, = set(answers) - before
    assert set(answers) - {new} == before
    # its first request already: HEAD's version, read from S3 (the board keeps no HEAD)
    assert answers[new][0] == (v3_name, pair.expected("v3")), answers[new]
    for replica, found in answers.items():
        assert found == [(v3_name, pair.expected("v3"))] * len(found), (replica, found)
    views = pair.inspect_each(2)
    assert views[new]["current"][TENANT]["version"] == v3
    assert [f for f in views[new]["adapter_files"] if f"tenants/{TENANT}/" in f] == [f"tenants/{TENANT}/adapters/{v3}"]
    assert set(pair.ask_http(4)) == {(v3_name, pair.expected("v3"))}


def test_a_tenants_requests_go_to_the_replica_that_holds_its_adapter(pair):
    """Through the ingress, which names the tenant as Serve's multiplexed model id: after its first request
    (which loads its adapter on one replica), every request of a tenant goes to that replica, so its
    adapter is loaded once, not once per replica. Without the model id Serve spreads requests at random:
    8 sequential requests would all reach one of 2 replicas with probability 1/128."""
    views = pair.inspect_each(2)
    assert all(OTHER not in view["current"] for view in views.values()), views
    name = f"{OTHER}@{pair.store.get_head(OTHER)[0].adapter}"
    expected = pair.served.reference(OTHER_FILES, pair.prompt, MAX_TOKENS)
    assert pair.ask_http(1, OTHER) == [(name, expected)]  # loads the adapter on one replica
    # that replica reports the tenant (pushed every 0.1 s); the ingress's router hears it by long poll
    time.sleep(2.0)
    assert pair.ask_http(8, OTHER) == [(name, expected)] * 8
    views = pair.inspect_each(2)
    holders = {replica: view["current"][OTHER] for replica, view in views.items() if OTHER in view["current"]}
    assert len(holders) == 1, f"{OTHER}'s adapter was loaded on {len(holders)} replicas: {holders}"
    assert not [r for view in views.values() for r in view["retired"] if r["tenant"] == OTHER], views
    for view in views.values():  # gamma, which both replicas served before, stays on both
        assert view["current"][TENANT]["version"] == pair.versions["v3"], view["current"]


def test_a_tenants_requests_spill_to_another_replica_when_its_replica_is_full(pair):
    """Affinity never queues a tenant behind a full replica: with ``max_ongoing_requests`` 1 (changed in
    place: same replicas, same adapters), 3 long requests at once for the tenant that one replica holds
    cannot all run there; Serve gives the others to the replica with fewer tenants, which loads the
    adapter too (from then on both are preferred for the tenant)."""
    import concurrent.futures

    before = pair.inspect_each(2)
    holders = {replica for replica, view in before.items() if OTHER in view["current"]}
    assert len(holders) == 1, before
    pair.deploy(2, max_ongoing_requests=1)
    time.sleep(3.0)  # the replicas' and the router's view of the new limit
    assert set(pair.inspect_each(2)) == set(before), "the replicas were replaced, not reconfigured"
    name = f"{OTHER}@{pair.store.get_head(OTHER)[0].adapter}"

    def long_request(_: int) -> tuple[int, str]:
        response = httpx.post(f"{pair.url}/v1/completions", headers={"Authorization": f"Bearer {pair.keys[OTHER]}"},
                              json={"model": OTHER, "prompt": pair.prompt, "max_tokens": 150, "ignore_eos": True,
                                    "temperature": 0}, timeout=120)
        return response.status_code, response.headers.get("x-eraser-adapter", response.text)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(long_request, range(3)))
    assert results == [(200, name)] * 3, results
    after = pair.inspect_each(2)
    assert all(OTHER in view["current"] for view in after.values()), {r: sorted(v["current"]) for r, v in after.items()}
    pair.deploy(2)  # back to the configured limit
