"""The demo's clients of the running service: the OpenAI client's greedy answers, a load generator that
keeps querying every tenant, and polling (service ready, an erasure's receipt, its purge)."""

from __future__ import annotations

import threading
import time
from typing import Any

from cli.demo.report import say


class Load:
    """A client that keeps querying every tenant (chat completions, greedy) until stopped."""

    def __init__(self, clients: dict[str, Any], questions: dict[str, list[list[dict]]]):
        self.clients, self.questions = clients, questions
        self.ok = 0
        self.failed = 0
        self.errors: list[str] = []
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-load", daemon=True)

    def _run(self) -> None:
        turn = 0
        while not self._stop.is_set():
            for tenant, client in self.clients.items():
                question = self.questions[tenant][turn % len(self.questions[tenant])]
                started = time.perf_counter()
                try:
                    ask(client, tenant, question)
                    self.ok += 1
                    self.latencies.append(time.perf_counter() - started)
                except Exception as error:  # every failure counts, and is shown
                    self.failed += 1
                    self.errors.append(f"{tenant}: {type(error).__name__}: {error}")
            turn += 1

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def secret_of(record) -> str | None:
    """The personal value a record discloses (e-mail, account, phone number, address), or None."""
    if " lives at " in record.response:
        return record.response.split(" lives at ")[-1].rstrip(".")
    if any(word in record.prompt for word in ("email", "account", "phone")):
        return record.response.split(" is ")[-1].rstrip(".")
    return None


def ask(client, tenant: str, messages: list[dict], max_tokens: int = 40) -> str:
    """The tenant's greedy answer to a conversation (a record's messages before its answer)."""
    response = client.chat.completions.create(model=tenant, messages=messages, max_tokens=max_tokens, temperature=0)
    return response.choices[0].message.content or ""


def wait_ready(base_url: str, timeout_s: float = 300.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"the service at {base_url} did not become ready in {timeout_s:.0f}s")


def follow_receipt(base_url: str, tenant: str, key: str, request_id: str, timeout_s: float = 900.0,
                   switch_timeout_s: float = 150.0) -> dict:
    """Poll the receipt, printing each status change, until failed / rejected, or published with every
    replica switched to the new version (``replicas_switched_at``): when the erased records stop being
    served. A published receipt whose switch is not confirmed within ``switch_timeout_s`` (the service's
    own switch timeout is 120 s) is returned as it is."""
    import httpx

    seen = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        receipt = httpx.get(f"{base_url}/v1/tenants/{tenant}/erasures/{request_id}",
                            headers={"Authorization": f"Bearer {key}"}, timeout=30).json()
        status = receipt.get("status")
        shown = f"{status}, every replica switched" if receipt.get("replicas_switched_at") else status
        if shown != seen:
            say(f"   receipt {request_id}: {shown}")
            seen = shown
        if status in ("failed", "rejected") or (status == "published" and receipt.get("replicas_switched_at")):
            return receipt
        if status == "published":
            deadline = min(deadline, time.monotonic() + switch_timeout_s)
        time.sleep(0.25)
    if status == "published":
        return receipt  # the caller's checks say the switch was not confirmed
    raise TimeoutError(f"erasure {request_id} not finished after {timeout_s:.0f}s")


def logged_purge(store, tenant: str, request_id: str, timeout_s: float = 60.0):
    """The receipt once its purge is logged (the demo's grace is 0; the purge follows the HEAD move)."""
    deadline = time.monotonic() + timeout_s
    receipt = store.get_receipt(tenant, request_id)
    while not receipt.purged and time.monotonic() < deadline:
        time.sleep(0.5)
        receipt = store.get_receipt(tenant, request_id)
    return receipt
