"""Live adapter switch under load: zero failed requests, old version finishes its in-flight work,
then is gone from the engine and the replica's disk; new answers equal the new adapter's HF/PEFT output."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from serve.board import SwitchNotifier
from tests.serve import models
from tests.serve.conftest import APP

pytestmark = pytest.mark.slow

MAX_TOKENS = 12
LONG_TOKENS = 220


def move_head(served, tenant: str, adapter: str) -> float:
    from tenants.models import Head

    head, etag = served.store.get_head(tenant)
    served.store.move_head(tenant, Head(adapter=served.versions[adapter], data=head.data), etag)
    return time.time()


def replicas(served) -> dict:
    response = httpx.get(f"{served.base_url}/v1/admin/replicas",
                         headers={"Authorization": f"Bearer {served.admin_key}"}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


class Load:
    """Client threads sending chat requests (streaming and not) until stopped; records every answer."""

    def __init__(self, served, tenant: str, questions: list[str], threads: int = 2) -> None:
        self.served, self.tenant, self.questions = served, tenant, questions
        self.results: list[tuple[float, float, str, str, str]] = []  # (start, end, question, adapter, text)
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _run(self, index: int) -> None:
        client = self.served.client(self.tenant, timeout=60)
        n = 0
        while not self._stop.is_set():
            question = self.questions[(index + n) % len(self.questions)]
            stream = (index + n) % 2 == 1
            n += 1
            started = time.time()
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model=self.tenant, messages=[{"role": "user", "content": question}], max_tokens=MAX_TOKENS,
                    temperature=0, stream=stream)
                adapter = raw.headers["x-eraser-adapter"]
                parsed = raw.parse()
                if stream:
                    text = "".join(c.choices[0].delta.content or "" for c in parsed if c.choices)
                else:
                    text = parsed.choices[0].message.content
                self.results.append((started, time.time(), question, adapter, text))
            except Exception as error:  # any failure fails the test
                self.failures.append(f"{type(error).__name__}: {error}")


@pytest.fixture
def restore_acme(served):
    """Put acme back on v1 afterwards, through the polling path (no notification), for the other tests."""
    yield
    v1 = served.versions["acme@v1"]
    if served.store.get_head("acme")[0].adapter == v1:
        return
    move_head(served, "acme", "acme@v1")
    deadline = time.time() + 30
    while replicas(served)["engine"]["current"].get("acme", {}).get("version") != v1:
        assert time.time() < deadline, "the refresh loop did not pick up the HEAD move"
        time.sleep(0.5)


def test_erasure_switch_under_load(served, restore_acme, capsys):
    v1, v2 = served.versions["acme@v1"], served.versions["acme@v2"]
    questions = models.QUESTIONS[:3]
    client = served.client("acme", timeout=60)
    before = replicas(served)["engine"]
    with Load(served, "acme", questions) as load:
        time.sleep(1.5)
        # a long request that is running when HEAD moves: it must finish on v1
        long_raw = client.completions.with_raw_response.create(
            model="acme", prompt=models.chat_ids(served.base_dir, questions[0]), max_tokens=LONG_TOKENS,
            temperature=0, stream=True, extra_body={"ignore_eos": True})
        long_stream = long_raw.parse()
        long_text = [next(iter(long_stream)).choices[0].text]
        moved_at = move_head(served, "acme", "acme@v2")
        report = SwitchNotifier(APP, timeout_s=60)("acme", v2)
        notified_at = time.time()
        long_text += [chunk.choices[0].text for chunk in long_stream]
        time.sleep(1.5)
    assert load.failures == []
    assert report is not None and report["complete"], report

    # every answer came from exactly the version it started on, and equals HF/PEFT for that version
    by_version = {f"acme@{v1}": "acme@v1", f"acme@{v2}": "acme@v2"}
    seen = set()
    for started, ended, question, adapter, text in load.results:
        assert adapter in by_version, adapter
        ids = models.chat_ids(served.base_dir, question)
        assert text == served.reference(by_version[adapter], ids, MAX_TOKENS), (adapter, question)
        if started > notified_at:
            assert adapter == f"acme@{v2}"
        seen.add(adapter)
    assert seen == set(by_version), "the load must straddle the switch"
    assert long_raw.headers["x-eraser-adapter"] == f"acme@{v1}"
    first = served.reference("acme@v1", models.chat_ids(served.base_dir, questions[0]), MAX_TOKENS)
    assert "".join(long_text).startswith(first)

    # the old version is gone from the engine and from the replica's disk, and the switch waited for it
    event = next(iter(report["replicas"].values()))
    assert event["old_version"] == v1 and event["new_version"] == v2
    assert event["in_flight"] >= 1 and event["dropped_at"] >= event["serving_at"]
    after = replicas(served)["engine"]
    old_id = before["current"]["acme"]["lora_int_id"]
    assert after["current"]["acme"]["version"] == v2
    assert after["current"]["acme"]["lora_int_id"] > old_id
    assert after["current"]["acme"]["lora_name"] == f"acme@{v2}"
    assert after["current"]["acme"]["path"] != before["current"]["acme"]["path"]
    assert old_id not in after["engine_lora_ids"]
    assert after["retired"] == []
    assert f"tenants/acme/adapters/{v1}" not in after["adapter_files"]
    assert f"tenants/acme/adapters/{v2}" in after["adapter_files"]

    # the same prompt again (prefix cache would hit if keyed by anything old): the new adapter's answer
    for question in questions:
        chat = client.chat.completions.create(model="acme", messages=[{"role": "user", "content": question}],
                                              max_tokens=MAX_TOKENS, temperature=0)
        assert chat.choices[0].message.content == served.reference(
            "acme@v2", models.chat_ids(served.base_dir, question), MAX_TOKENS)
    with capsys.disabled():
        print(f"\n[switch] requests={len(load.results)} failures=0 in_flight_at_switch={event['in_flight']} "
              f"head->serving={event['serving_at'] - moved_at:.3f}s head->all replicas dropped old="
              f"{event['dropped_at'] - moved_at:.3f}s (board: {report['seconds']:.3f}s after publish)")
