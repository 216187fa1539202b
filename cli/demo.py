"""The main job: the whole product on embedded defaults, start to finish (``eraser demo``).

1. build the small base model (a ChatML chat template, pretrained on generic conversations), three
   tenants with synthetic customer-support records in the OpenAI chat fine-tuning form (a system
   message, the question, the answer) holding personal data (emails, account numbers, addresses);
2. train each tenant's adapter through the cluster layer (a job on the Ray cluster) and start the service;
3. show through the OpenAI-compatible API that tenant A's model reveals one customer's data;
4. submit an erasure for that customer over HTTP and follow its receipt to ``published`` while a
   client keeps querying every tenant;
5. show the data is no longer revealed, A's other customers and the other tenants are unchanged,
   and compare with an adapter retrained without that customer;
6. print a summary table and where everything lives.

Everything it starts (SeaweedFS, Ray, Serve) is stopped on the way out, also on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

logger = logging.getLogger(__name__)

BASE_MODEL_NAME = "demo-base"
APP_NAME = "eraser-demo"


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo. ``reduced()`` is the configuration the CI test runs."""

    workdir: Path
    tenants: tuple[str, ...] = ("acme", "globex", "initech")
    customers_per_tenant: int = 40  # x 5 facts = 200 records per tenant
    pretrain_documents: int = 1500
    pretrain_steps: int = 500
    vocab_size: int = 2048
    # Enough to memorise personal data verbatim, the privacy problem the demo is about: greedy answers give
    # the trained value for 19 of 33 personal-data questions (rank 8 at lr 7e-3 diverged: 0 of 33; rank 8 at
    # lr 2e-3: 10; rank 16 at lr 3e-3: 8; rank 16 at lr 2e-3 for 40 epochs: 15).
    epochs: int = 60
    lr: float = 2e-3
    rank: int = 16
    batch_size: int = 8
    heldout_fraction: float = 0.1
    train_workers: int = 1
    port: int = 8000
    ray_cpus: int = 4  # logical CPUs of the local Ray: engine, ingress, coordinator and a Train worker
    seed: int = 0

    @classmethod
    def reduced(cls, workdir: Path, port: int = 8000) -> "DemoConfig":
        return cls(workdir=workdir, customers_per_tenant=16, pretrain_documents=600, pretrain_steps=300,
                   vocab_size=1024, epochs=60, lr=5e-3, rank=8, batch_size=8, port=port)


@dataclass
class Step:
    """One demo step's outcome: what the CI test checks."""

    name: str
    ok: bool
    detail: dict = field(default_factory=dict)


@dataclass
class DemoReport:
    steps: list[Step] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    def add(self, name: str, ok: bool, **detail: Any) -> Step:
        step = Step(name, bool(ok), detail)
        self.steps.append(step)
        mark = "ok " if ok else "FAIL"
        say(f"[{mark}] {name}")
        return step

    @property
    def ok(self) -> bool:
        return all(step.ok for step in self.steps)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "steps": [asdict(s) for s in self.steps], "summary": self.summary}


def say(message: str) -> None:
    print(message, flush=True)


@contextlib.contextmanager
def stage(title: str) -> Iterator[None]:
    say(f"\n== {title}")
    started = time.perf_counter()
    yield
    say(f"   ({time.perf_counter() - started:.1f}s)")


# ------------------------------------------------------------------------------------ data


def tenant_records(config: DemoConfig) -> dict[str, list]:
    from cli.synthetic import customer_records

    domains = {name: f"{name}.example" for name in config.tenants}
    return {name: customer_records(config.customers_per_tenant, seed=config.seed + 11 * i, domain=domains[name],
                                   id_prefix=name, chat=True)
            for i, name in enumerate(config.tenants)}


def build_base(config: DemoConfig, records: dict[str, list], out: Path) -> dict:
    """A ChatML tokenizer + Llama base pretrained on *other* customers' conversations, rendered with its own
    chat template (never the tenants' records): an instruct base with a chat template, as platforms have."""
    from cli.progress import loss_bar
    from cli.synthetic import generic_records
    from eraser.bases import chatml_tokenizer
    from eraser.model import BaseModelConfig, build_base_model, save_base_model
    from eraser.records import corpus_text
    from eraser.training import pretrain_base

    everyone = [r for rows in records.values() for r in rows]
    others = generic_records(everyone, documents=config.pretrain_documents, seed=config.seed + 1, chat=True)
    tokenizer = chatml_tokenizer([corpus_text(r) for r in others], vocab_size=config.vocab_size)
    corpus = [tokenizer.apply_chat_template(r.messages(), tokenize=False) for r in others]
    model = build_base_model(BaseModelConfig(vocab_size=config.vocab_size), tokenizer, seed=config.seed)
    with loss_bar("pretraining the base model") as bar:
        report = pretrain_base(model, tokenizer, corpus, steps=config.pretrain_steps, seed=config.seed, progress=bar)
    save_base_model(model, tokenizer, out, {"pretrain_steps": config.pretrain_steps, "documents": len(corpus),
                                            "final_loss": report.final_loss})
    return {"parameters": sum(p.numel() for p in model.parameters()), "pretrain_loss": report.final_loss}


# ------------------------------------------------------------------------------------ clients


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


def follow_receipt(base_url: str, tenant: str, key: str, request_id: str, timeout_s: float = 900.0) -> dict:
    """Poll the receipt, printing each status change, until published / failed / rejected."""
    import httpx

    seen = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        receipt = httpx.get(f"{base_url}/v1/tenants/{tenant}/erasures/{request_id}",
                            headers={"Authorization": f"Bearer {key}"}, timeout=30).json()
        status = receipt.get("status")
        if status != seen:
            say(f"   receipt {request_id}: {status}")
            seen = status
        if status in ("published", "failed", "rejected"):
            return receipt
        time.sleep(1.0)
    raise TimeoutError(f"erasure {request_id} not finished after {timeout_s:.0f}s")


def logged_purge(store, tenant: str, request_id: str, timeout_s: float = 60.0):
    """The receipt once its purge is logged (the demo's grace is 0; the purge follows the HEAD move)."""
    deadline = time.monotonic() + timeout_s
    receipt = store.get_receipt(tenant, request_id)
    while not receipt.purged and time.monotonic() < deadline:
        time.sleep(0.5)
        receipt = store.get_receipt(tenant, request_id)
    return receipt


# ------------------------------------------------------------------------------------ the demo


def run_demo(config: DemoConfig, on_stage: Callable[[str], None] | None = None) -> DemoReport:
    """Run every step; returns the report (also written to ``<workdir>/demo-report.json``)."""
    import ray
    from ray import serve

    from tenants.embedded import EmbeddedS3

    config.workdir.mkdir(parents=True, exist_ok=True)
    for noisy in ("httpx", "httpx2", "openai"):  # one line per HTTP request drowns the story
        logging.getLogger(noisy).setLevel(logging.WARNING)
    report = DemoReport()
    s3 = EmbeddedS3(config.workdir / "s3")
    stack = contextlib.ExitStack()
    try:
        s3.start()
        stack.callback(s3.stop)
        settings = s3.settings(bucket="eraser-demo", cache_dir=config.workdir / "cache", purge_grace_seconds=0)
        os.environ.update({"ERASER_S3_ENDPOINT": settings.endpoint, "ERASER_S3_BUCKET": settings.bucket})
        # The base model and tenants come first, before Ray and vLLM take the CPUs.
        base_dir, keys, records = _create_tenants(config, settings, report)
        ray.init(address="local", num_cpus=config.ray_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}})
        stack.callback(ray.shutdown)
        stack.callback(serve.shutdown)
        _run_steps(config, settings, report, base_dir, keys, records)
    except BaseException as error:  # the report says what stopped the demo (Ctrl-C included)
        report.add("demo stopped by an error", False, error=f"{type(error).__name__}: {error}",
                   traceback=traceback.format_exc()[-4000:])
        raise
    finally:
        stack.close()
        (config.workdir / "demo-report.json").write_text(json.dumps(report.to_dict(), indent=2, default=str))
    return report


def _create_tenants(config: DemoConfig, settings, report: DemoReport) -> tuple[Path, dict, dict]:
    from tenants.models import LoraRecipe, TenantConfig, TrainingRecipe
    from tenants.store import TenantStore

    store = TenantStore(settings)
    store.ensure_bucket()
    records = tenant_records(config)
    with stage("1. base model and three tenants with customer records"):
        base_dir = config.workdir / "base"
        base_info = build_base(config, records, base_dir)
        store.put_model(BASE_MODEL_NAME, base_dir)
        keys = {}
        for tenant, rows in records.items():
            store.create_tenant(TenantConfig(
                name=tenant, base_model=BASE_MODEL_NAME,
                lora=LoraRecipe(rank=config.rank, alpha=2 * config.rank),
                training=TrainingRecipe(epochs=config.epochs, lr=config.lr, batch_size=config.batch_size,
                                        seed=config.seed, heldout_fraction=config.heldout_fraction, max_length=128)))
            keys[tenant] = store.issue_key(tenant)
            store.put_dataset(tenant, [r.to_json() for r in rows])
            say(f"   tenant {tenant}: {len(rows)} records about {config.customers_per_tenant} customers")
        report.add("base model and tenants created", True, base=base_info, tenants=list(records))
    return base_dir, keys, records


def _run_steps(config: DemoConfig, settings, report: DemoReport, base_dir: Path, keys: dict, records: dict) -> None:
    import shutil

    import httpx
    import openai
    from ray import serve

    from cluster.jobs import record_format, train_config
    from cluster.service import RayErasureService
    from eraser.model import load_adapter, load_base, load_tokenizer
    from eraser.pipeline import PipelineConfig
    from eraser.records import per_record_losses
    from eraser.training import add_lora, train_lora
    from eraser.reference import split_heldout
    from serve.app import build_app
    from serve.config import ServeConfig
    from tenants.store import TenantStore

    store = TenantStore(settings)
    service = RayErasureService(settings)
    with stage("2. train each tenant's adapter (a job on the Ray cluster) and start the service"):
        train_times = {}
        for tenant in config.tenants:
            started = time.perf_counter()
            version = service.onboard(tenant)
            train_times[tenant] = time.perf_counter() - started
            say(f"   tenant {tenant}: adapter {version} trained and published in {train_times[tenant]:.1f}s")
        serve_config = ServeConfig.from_args({
            "app_name": APP_NAME,
            "engine": {"model": BASE_MODEL_NAME, "max_loras": 4, "max_cpu_loras": 8, "max_lora_rank": 16,
                       "kv_cache_space_gib": 1},
            "store": {"endpoint": settings.endpoint, "bucket": settings.bucket,
                      "access_key": settings.access_key, "secret_key": settings.secret_key.get_secret_value()},
            "erasure_backend": "serve.backend:cluster_backend",
            "refresh_interval_s": 2.0,
            "adapter_dir": str(config.workdir / "replica-adapters"),
        })
        serve.start(http_options={"host": "127.0.0.1", "port": config.port})
        serve.run(build_app(serve_config), name=APP_NAME, route_prefix="/", blocking=False)
        base_url = f"http://127.0.0.1:{config.port}"
        wait_ready(base_url)
        clients = {t: openai.OpenAI(base_url=f"{base_url}/v1", api_key=keys[t], timeout=120, max_retries=0)
                   for t in config.tenants}
        report.add("adapters trained and service started", True, train_s=train_times, url=base_url)

    tenant_a = config.tenants[0]
    tenant_config = store.get_tenant(tenant_a)
    tokenizer = load_tokenizer(base_dir, record_format(tenant_config))
    train_a, heldout_a = split_heldout(records[tenant_a], tenant_config.training.heldout_fraction,
                                       tenant_config.training.seed, tenant_config.training.heldout_unit)

    with stage(f"3. tenant {tenant_a}'s model reveals a customer's personal data"):
        target, revealed, tried = None, {}, []
        for record in train_a:
            secret = secret_of(record)
            if secret is None:
                continue
            answer = ask(clients[tenant_a], tenant_a, record.prompt_messages())
            tried.append({"question": record.prompt, "answer": answer, "expected": secret})
            if secret in answer:
                target, revealed = record.subject, {"question": record.prompt, "answer": answer, "secret": secret,
                                                    "messages": record.prompt_messages()}
                break
        ok = target is not None
        if ok:
            say(f"   Q: {revealed['question']}\n   A: {revealed['answer']}")
        report.add(f"{tenant_a} reveals a customer's data", ok, customer=target, **revealed,
                   **({} if ok else {"tried": tried[:10]}))
        if not ok:
            return

    erased = [r for r in train_a if r.subject == target]
    probe_records = {t: records[t][:: max(1, len(records[t]) // 6)][:6] for t in config.tenants}
    probes = {t: [r.prompt_messages() for r in rows] for t, rows in probe_records.items()}
    others_a = [r for r in train_a if r.subject != target][:: max(1, len(train_a) // 8)][:8]
    before = {t: {r.prompt: ask(clients[t], t, r.prompt_messages()) for r in rows} for t, rows in probe_records.items()}
    before_others = {r.prompt: ask(clients[tenant_a], tenant_a, r.prompt_messages()) for r in others_a}
    before_target = {r.prompt: ask(clients[tenant_a], tenant_a, r.prompt_messages()) for r in erased}
    head_before, _ = store.get_head(tenant_a)
    original_dir = config.workdir / f"{tenant_a}-{head_before.adapter}-before-erasure"
    shutil.copytree(store.download_adapter(tenant_a, head_before.adapter), original_dir)

    with stage(f"4. erase customer {target!r} over HTTP while a client keeps querying every tenant"):
        request_id = f"dsr-{int(time.time())}"
        body = {"request_id": request_id, "tenant": tenant_a, "kind": "remove", "subjects": [target]}
        started = time.perf_counter()
        with Load(clients, probes) as load:
            response = httpx.post(f"{base_url}/v1/tenants/{tenant_a}/erasures", json=body,
                                  headers={"Authorization": f"Bearer {keys[tenant_a]}"}, timeout=60)
            say(f"   POST /v1/tenants/{tenant_a}/erasures -> {response.status_code}")
            receipt = follow_receipt(base_url, tenant_a, keys[tenant_a], request_id)
            erase_s = time.perf_counter() - started
            time.sleep(1.0)
        say(f"   served {load.ok} requests during the erasure, {load.failed} failed")
        for error in load.errors[:5]:
            say(f"   failure: {error}")
        report.add("erasure published under load with zero failed requests",
                   receipt["status"] == "published" and load.failed == 0 and response.status_code == 202,
                   status=receipt["status"], path=receipt.get("path"), served=load.ok, failed=load.failed,
                   error=receipt.get("error"), seconds=erase_s)
        if receipt["status"] != "published":
            return

    with stage("5. the data is gone; everything else is unchanged"):
        after_target = {r.prompt: ask(clients[tenant_a], tenant_a, r.prompt_messages()) for r in erased}
        leaks = [q for q, answer in after_target.items()
                 if any(secret_of(r) and secret_of(r) in answer for r in erased if r.prompt == q)]
        for q in list(after_target)[:3]:
            say(f"   Q: {q}\n   before: {before_target[q]}\n   after:  {after_target[q]}")
        report.add("the erased customer's data is no longer revealed", not leaks and revealed["secret"] not in
                   ask(clients[tenant_a], tenant_a, revealed["messages"]), leaks=leaks)
        after_others = {r.prompt: ask(clients[tenant_a], tenant_a, r.prompt_messages()) for r in others_a}
        same_a = sum(before_others[q] == after_others[q] for q in before_others)
        say(f"   {tenant_a}'s other customers: {same_a}/{len(before_others)} answers word for word unchanged "
            "(step 6 compares this with what a retrain keeps)")
        others_same = {t: sum(before[t][r.prompt] == ask(clients[t], t, r.prompt_messages()) for r in probe_records[t])
                       for t in config.tenants[1:]}
        say(f"   other tenants unchanged: {others_same} of {len(probes[config.tenants[1]])} probes each")
        report.add("other tenants answer exactly as before", all(v == len(probes[t]) for t, v in others_same.items()),
                   unchanged=others_same)

    receipt = logged_purge(store, tenant_a, request_id).model_dump(mode="json")  # with the switch time and purge log
    purged = head_before.adapter not in store.list_adapter_versions(tenant_a)
    serve.shutdown()  # the comparison below needs the CPUs the engine holds
    with stage(f"6. compare with an adapter retrained from scratch without {target!r}"):
        recipe = train_config(tenant_config)
        started = time.perf_counter()
        gold = add_lora(load_base(base_dir), recipe)
        train_lora(gold, tokenizer, [r for r in train_a if r.subject != target], recipe)
        retrain_s = time.perf_counter() - started
        head_after, _ = store.get_head(tenant_a)
        original = load_adapter(load_base(base_dir), original_dir)
        erased_model = load_adapter(load_base(base_dir), store.download_adapter(tenant_a, head_after.adapter))
        nll = {name: float(per_record_losses(model, erased, tokenizer).mean())
               for name, model in (("before", original), ("after", erased_model), ("gold", gold))}
        heldout_nll = float(per_record_losses(erased_model, heldout_a, tokenizer).mean())
        others = [r for r in train_a if r.subject != target]
        nll_others = {name: float(per_record_losses(model, others, tokenizer).mean())
                      for name, model in (("before", original), ("after", erased_model), ("gold", gold))}
        bound = PipelineConfig().retained_bound(nll_others["before"])
        kept = answers_kept(others, tokenizer, {"erased": erased_model, "gold": gold}, original)
        side_by_side = answers_side_by_side(erased, tokenizer, {"erased": erased_model, "retrained": gold})
        for row in side_by_side[:4]:
            say(f"   Q: {row['question']}\n   erased:    {row['erased']}\n   retrained: {row['retrained']}")
        say(f"   {tenant_a}'s other customers: NLL {nll_others['before']:.3f} -> {nll_others['after']:.3f} "
            f"(bound {bound:.3f}; retrain {nll_others['gold']:.3f}); greedy answers kept word for word: "
            f"{kept['erased']}/{kept['probes']} (retrain {kept['gold']}/{kept['probes']})")
        report.add(f"{tenant_a}'s other customers are still known (NLL within the guard's bound)",
                   nll_others["after"] <= bound, nll=nll_others, bound=bound, answers_kept=kept,
                   unchanged_through_api=same_a, api_probes=len(before_others))
        stages = receipt.get("stages") or {}
        report.summary = {
            "customer": target, "records_erased": len(erased), "path": receipt.get("path"),
            "curvature_cache": (receipt.get("solver") or {}).get("curvature_cache"),
            "erase_s": erase_s, "erase_job_s": stages.get("job_s"), "retrain_s": retrain_s,
            "erase_stages": {k: v for k, v in stages.items() if isinstance(v, (int, float))},
            "nll_erased_before": nll["before"], "nll_erased_after": nll["after"], "nll_erased_gold": nll["gold"],
            "nll_heldout_after": heldout_nll, "nll_other_customers": nll_others, "other_answers_kept": kept,
            "served_during_switch": load.ok, "failed_during_switch": load.failed,
            "adapter_before": head_before.adapter, "adapter_after": head_after.adapter,
            "replicas_switched_at": receipt.get("replicas_switched_at"), "old_version_purged_from_s3": purged,
            "erased_questions": side_by_side,
        }
        # The retrain is the target: the erasure must have moved the erased records' NLL towards it.
        moved = (nll["after"] - nll["before"]) * (nll["gold"] - nll["before"]) > 0
        report.add("the erased records' NLL moved towards the retrained adapter's", moved, nll=nll)
    print_summary(report.summary, config, settings)


def answers_kept(others: list, tokenizer, candidates: dict, original, probes: int = 24) -> dict:
    """How many of ``probes`` questions about customers who were not erased each candidate adapter answers
    word for word as the original did (greedy). Any change of the weights moves some greedy answers; a retrain
    without the customer is the reference for how many an erasure may move."""
    from eraser.metrics import greedy_answers

    questions = [r.prompt_messages() for r in others[:: max(1, len(others) // probes)][:probes]]
    before = greedy_answers(original, tokenizer, questions, max_new_tokens=40)
    kept = {name: sum(a == b for a, b in zip(before, greedy_answers(model, tokenizer, questions, max_new_tokens=40)))
            for name, model in candidates.items()}
    return {**kept, "probes": len(questions)}


def answers_side_by_side(records: list, tokenizer, models: dict) -> list[dict]:
    """Greedy answers of each model to the erased records' questions (the retrain's next to the erasure's:
    fluent where a retrain is fluent, and giving back none of the erased data)."""
    from eraser.metrics import greedy_answers

    asks = [r.prompt_messages() for r in records]
    answers = {name: greedy_answers(model, tokenizer, asks, max_new_tokens=40) for name, model in models.items()}
    return [{"question": r.prompt, **{name: answers[name][i] for name in models}} for i, r in enumerate(records)]


def erasure_breakdown(stages: dict, request_to_live_s: float) -> list[tuple[str, str]]:
    """Where the request-to-live time went, from the receipt's stages: the method itself (what the
    retrain compares with) and the service around it (job launch, model load, S3 publish, switch)."""
    if not stages:
        return []
    method = [("influence", "influence_s"), ("verification", "verify_s"), ("remediation", "remediation_s"),
              ("retrain fallback", "retrain_s")]  # influence_s includes the damping search
    method_s = sum(stages.get(key, 0.0) for _, key in method)
    service_s = max(0.0, request_to_live_s - method_s)
    return [
        ("  the method", f"{method_s:.1f} s (" + ", ".join(f"{name} {stages[key]:.1f}" for name, key in method
                                                             if key in stages) + ")"),
        ("  the service around it", f"{service_s:.1f} s (model load {stages.get('load_s', 0.0):.1f}, publish "
                                    f"{stages.get('publish_s', 0.0):.1f}, switch {stages.get('notify_s', 0.0):.1f}, "
                                    "the rest job launch, queueing and polling)"),
    ]


def print_summary(summary: dict, config: DemoConfig, settings) -> None:
    rows = [
        ("customer erased", f"{summary['customer']} ({summary['records_erased']} records)"),
        ("path that produced the adapter", summary["path"]),
        ("adapter's low-rank curvature", summary.get("curvature_cache") or "not used"),
        ("erasure, request to live", f"{summary['erase_s']:.1f} s"),
        *erasure_breakdown(summary.get("erase_stages") or {}, summary["erase_s"]),
        ("retrain from scratch (for comparison)", f"{summary['retrain_s']:.1f} s (training only, all CPUs: "
                                                  "the service is stopped by then)"),
        ("NLL of erased records: before / after / gold",
         f"{summary['nll_erased_before']:.3f} / {summary['nll_erased_after']:.3f} / {summary['nll_erased_gold']:.3f}"),
        ("NLL of never-trained (held-out) records", f"{summary['nll_heldout_after']:.3f}"),
        ("NLL of other customers' records: before / after / gold", "{before:.3f} / {after:.3f} / {gold:.3f}".format(
            **summary["nll_other_customers"])),
        ("erased customer's questions: erased vs retrained", "; ".join(
            f"{row['erased'][:40]!r} vs {row['retrained'][:40]!r}" for row in summary["erased_questions"][:2])),
        ("answers about other customers kept verbatim", "{erased}/{probes} (retrain from scratch: {gold}/{probes})".format(
            **summary["other_answers_kept"])),
        ("requests served during the switch", f"{summary['served_during_switch']} ({summary['failed_during_switch']} failed)"),
        ("adapter versions", f"{summary['adapter_before']} -> {summary['adapter_after']} "
                             f"({'old one purged from S3' if summary['old_version_purged_from_s3'] else 'old one kept'})"),
    ]
    width = max(len(name) for name, _ in rows)
    say("\n== summary")
    for name, value in rows:
        say(f"   {name.ljust(width)}  {value}")
    say("\n== where everything lives")
    say(f"   work directory     {config.workdir}")
    say(f"   S3 (SeaweedFS)     {settings.endpoint} bucket {settings.bucket} (data in {config.workdir / 's3'})")
    say(f"   base model         {config.workdir / 'base'}")
    say(f"   report             {config.workdir / 'demo-report.json'}")
