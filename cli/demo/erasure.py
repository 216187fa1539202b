"""Steps 3 to 5, through the running service: tenant A's model reveals a customer's personal data; the
customer is erased over HTTP while a client keeps querying every tenant; then the data is no longer
revealed and the other tenants answer exactly as before.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cli.demo.clients import Load, ask, follow_receipt, secret_of
from cli.demo.config import DemoConfig
from cli.demo.report import DemoReport, say, stage
from cli.demo.service import Service
from cli.demo.world import World


@dataclass
class Focus:
    """Tenant A, whose customer is erased: its config, tokenizer and the split its adapter was trained with."""

    name: str
    config: Any
    tokenizer: Any
    train: list
    heldout: list


@dataclass
class Revealed:
    """The customer whose personal data tenant A's model gave back, and the question that showed it."""

    customer: str
    question: str
    answer: str
    secret: str
    messages: list[dict]


@dataclass
class Before:
    """What the service answered, and which adapter was live, before the erasure."""

    erased: list  # tenant A's training records about the customer
    probe_records: dict[str, list]  # a few records of every tenant, asked during and after the erasure
    others: list  # tenant A's records about other customers
    answers: dict[str, dict[str, str]]
    answers_others: dict[str, str]
    answers_erased: dict[str, str]
    head: Any
    original_dir: Path

    @property
    def probes(self) -> dict[str, list[list[dict]]]:
        return {t: [r.prompt_messages() for r in rows] for t, rows in self.probe_records.items()}


@dataclass
class Erasure:
    """Step 4's outcome: the receipt and what the load saw meanwhile."""

    request_id: str
    receipt: dict
    seconds: float
    served: int
    failed: int


def focus_on(config: DemoConfig, store, world: World) -> Focus:
    from cluster.jobs import record_format
    from eraser.model import load_tokenizer
    from eraser.reference import split_heldout

    name = config.tenants[0]
    tenant_config = store.get_tenant(name)
    tokenizer = load_tokenizer(world.base_dir, record_format(tenant_config))
    training = tenant_config.training
    train, heldout = split_heldout(world.records[name], training.heldout_fraction, training.seed, training.heldout_unit)
    return Focus(name, tenant_config, tokenizer, train, heldout)


def reveal(focus: Focus, service: Service, report: DemoReport) -> Revealed | None:
    """Step 3: the first personal-data question of A's training records whose greedy answer gives it back."""
    client = service.clients[focus.name]
    with stage(f"3. tenant {focus.name}'s model reveals a customer's personal data"):
        revealed, tried = None, []
        for record in focus.train:
            secret = secret_of(record)
            if secret is None:
                continue
            answer = ask(client, focus.name, record.prompt_messages())
            tried.append({"question": record.prompt, "answer": answer, "expected": secret})
            if secret in answer:
                revealed = Revealed(record.subject, record.prompt, answer, secret, record.prompt_messages())
                break
        if revealed is not None:
            say(f"   Q: {revealed.question}\n   A: {revealed.answer}")
            report.add(f"{focus.name} reveals a customer's data", True, **asdict(revealed))
        else:
            report.add(f"{focus.name} reveals a customer's data", False, customer=None, tried=tried[:10])
    return revealed


def snapshot(config: DemoConfig, store, world: World, service: Service, focus: Focus, customer: str) -> Before:
    """The answers steps 4 and 5 use, and a copy of the adapter live before the erasure (for step 6)."""
    clients, a = service.clients, focus.name
    probe_records = {t: world.records[t][:: max(1, len(world.records[t]) // 6)][:6] for t in config.tenants}
    erased = [r for r in focus.train if r.subject == customer]
    others = [r for r in focus.train if r.subject != customer][:: max(1, len(focus.train) // 8)][:8]
    answers = {t: {r.prompt: ask(clients[t], t, r.prompt_messages()) for r in rows} for t, rows in probe_records.items()}
    answers_others = {r.prompt: ask(clients[a], a, r.prompt_messages()) for r in others}
    answers_erased = {r.prompt: ask(clients[a], a, r.prompt_messages()) for r in erased}
    head, _ = store.get_head(a)
    original_dir = config.workdir / f"{a}-{head.adapter}-before-erasure"
    shutil.copytree(store.download_adapter(a, head.adapter), original_dir)
    return Before(erased, probe_records, others, answers, answers_others, answers_erased, head, original_dir)


def erase_under_load(service: Service, keys: dict[str, str], focus: Focus, customer: str, before: Before,
                     report: DemoReport) -> Erasure:
    """Step 4: POST the erasure and follow its receipt while :class:`Load` keeps querying every tenant."""
    import httpx

    a = focus.name
    with stage(f"4. erase customer {customer!r} over HTTP while a client keeps querying every tenant"):
        request_id = f"dsr-{int(time.time())}"
        body = {"request_id": request_id, "tenant": a, "kind": "remove", "subjects": [customer]}
        started = time.perf_counter()
        with Load(service.clients, before.probes) as load:
            response = httpx.post(f"{service.base_url}/v1/tenants/{a}/erasures", json=body,
                                  headers={"Authorization": f"Bearer {keys[a]}"}, timeout=60)
            say(f"   POST /v1/tenants/{a}/erasures -> {response.status_code}")
            receipt = follow_receipt(service.base_url, a, keys[a], request_id)
            erase_s = time.perf_counter() - started
            time.sleep(1.0)
        say(f"   served {load.ok} requests during the erasure, {load.failed} failed")
        for error in load.errors[:5]:
            say(f"   failure: {error}")
        report.add("erasure published and live on every replica under load, with zero failed requests",
                   receipt["status"] == "published" and bool(receipt.get("replicas_switched_at"))
                   and load.failed == 0 and response.status_code == 202,
                   status=receipt["status"], path=receipt.get("path"), served=load.ok, failed=load.failed,
                   error=receipt.get("error"), seconds=erase_s)
    return Erasure(request_id, receipt, erase_s, load.ok, load.failed)


def check_after(config: DemoConfig, service: Service, focus: Focus, revealed: Revealed, before: Before,
                report: DemoReport) -> int:
    """Step 5: the erased customer's data is not given back, the other tenants answer exactly as before.
    Returns how many of A's other-customer answers are unchanged word for word (step 6 reports it)."""
    clients, a = service.clients, focus.name
    with stage("5. the data is gone; everything else is unchanged"):
        after_erased = {r.prompt: ask(clients[a], a, r.prompt_messages()) for r in before.erased}
        leaks = [q for q, answer in after_erased.items()
                 if any(secret_of(r) and secret_of(r) in answer for r in before.erased if r.prompt == q)]
        for q in list(after_erased)[:3]:
            say(f"   Q: {q}\n   before: {before.answers_erased[q]}\n   after:  {after_erased[q]}")
        report.add("the erased customer's data is no longer revealed",
                   not leaks and revealed.secret not in ask(clients[a], a, revealed.messages), leaks=leaks)
        after_others = {r.prompt: ask(clients[a], a, r.prompt_messages()) for r in before.others}
        same_a = sum(before.answers_others[q] == after_others[q] for q in before.answers_others)
        say(f"   {a}'s other customers: {same_a}/{len(before.answers_others)} answers word for word unchanged "
            "(step 6 compares this with what a retrain keeps)")
        others_same = {t: sum(before.answers[t][r.prompt] == ask(clients[t], t, r.prompt_messages())
                              for r in before.probe_records[t])
                       for t in config.tenants[1:]}
        say(f"   other tenants unchanged: {others_same} of {len(before.probe_records[config.tenants[1]])} probes each")
        report.add("other tenants answer exactly as before",
                   all(v == len(before.probe_records[t]) for t, v in others_same.items()), unchanged=others_same)
    return same_a
