"""TOFU as a real tenant's chat data: a Qwen2-architecture base with a ChatML tokenizer, an adapter the
*platform* trained with plain PEFT code (not ``eraser.training``), imported as the service imports one,
then an erasure of two authors by ``eraser.pipeline.verified_erase`` with the production defaults,
against the gold: the same plain-PEFT training, same seed, without the two authors (issue 13).

    python -m benchmarks.tofu_chat                    # the default run (a few minutes on 2 cores)
    python -m benchmarks.tofu_chat --preset tiny --out /tmp/tofu_chat   # seconds: what the test runs

What it measures, step by step:

1. **Base.** ``eraser.bases.build_base("qwen2", ...)`` (grouped-query attention, q/k/v biases, tied
   embeddings) sized like the TOFU benchmark's Llama (hidden 128, 2 layers, 4 heads of 32, 2 KV heads,
   BPE vocabulary 2,048) with ``eraser.bases.chatml_tokenizer`` (its template: ChatML, as Qwen's; EOS
   ``<|im_end|>``), pretrained with ``eraser.training.pretrain_base`` (600 steps, as the TOFU base) on the
   rows of TOFU authors 0-79, which no tenant holds, each rendered by the ChatML template as a whole
   conversation. Cached in ``--cache-dir`` keyed by its recipe.
2. **The platform's adapter**, trained by the plain PEFT code in this file: ``get_peft_model`` with
   ``LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.05)``, AdamW, a
   fixed seed; batches of chat records rendered with ``apply_chat_template(..., return_assistant_tokens_mask=True)``
   under ``CHATML_GENERATION_TEMPLATE`` (what TRL's ``assistant_only_loss`` does). The loss is the mean NLL
   over each record's assistant tokens, averaged over the records of the batch. TRL's default (and HF
   Trainer's) is the token-weighted batch mean (sum of assistant-token NLLs over the batch / their count),
   a different objective that weights long answers more; the method differentiates per-record means
   (``eraser.records.record_losses``), so the platform here trains on that one (a platform training with
   TRL's default would hand the method an adapter trained on a slightly different objective: not measured
   here). Tenant: 40 TOFU authors (160-199) as chat records ``{"messages": [user: question, assistant:
   answer]}``, subject = author, 2 rows per author held out (the seen-subject reference) and 4 further
   authors (80-83) never trained on (the unseen-subject reference).
3. **Import** as the service does: ``save_pretrained``, then ``eraser.model.load_base`` + ``load_adapter``,
   the tokenizer from ``eraser.model.load_tokenizer(base_dir)`` (the base's own ChatML template, no
   generation markers: the method finds the assistant turns itself). Checked: the method's loss of a few
   records equals the plain-PEFT training loss of them within 1e-5 (in the JSON, ``loss_check``).
4. **Request**: remove two authors (all their record ids, held-out rows included, as a data subject's
   erasure would); ``verified_erase(model, tokenizer, train, [request], heldout=reference, recipe=None,
   config=PipelineConfig())``: an imported adapter has no recipe, so there is no exact-retrain fallback.
   Timed from the loaded adapter with its curvature cache warm: the cache is built once before the
   requests (``cache_build`` in the JSON), as the service's coordinators build it per adapter version
   when idle; the speed-ups are reported warm and with the build charged to the request.
5. **Gold**: the plain-PEFT retrain (same code, same seed) without the two authors; with ``--noise-floor``
   also the retrain with seed + 1 (what "as close as retraining" can mean). Reported: the erased
   authors' NLL (the method's loss in the tenant's own format) under original / erased / retrain,
   progress = (erased - original) / (retrain - original) (target >= 0.5), the retained rows' mean NLL
   erased vs retrain (target: within max(10%, 0.05 nats)), the path and verified flag, wall and CPU
   seconds of the erasure against the retrain, and whether the retrain itself passes the membership test
   the pipeline's first look runs (same deciding half, same level): a retrain that fails it marks a false
   failure of the test, not of the update.

Output in ``--out``: ``results.json`` (everything, the command line, versions) and ``nll.png`` when
matplotlib is installed.

Why one module of about 600 lines: the benchmark is one procedure (setup, requests, golds, table, command
line) read top to bottom; its reusable parts live in ``tofu_data``, ``tofu_setup``, ``tofu_metrics``,
``plain_peft`` and ``provenance``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from benchmarks import provenance
from benchmarks.plain_peft import chat_example, chat_example_of, plain_losses, plain_peft_train

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"progress_min": 0.5, "retained_rel_max": 0.10, "retained_abs_max": 0.05, "loss_check_atol": 1e-5}
BASE_FORMAT = 1  # bump when the base's construction changes (invalidates the cache)


@dataclass(frozen=True)
class Options:
    """Everything a run depends on (``--help`` documents each)."""

    # the tenant: its authors are the last ``tenant_authors`` of TOFU's 200
    tenant_authors: int = 40
    heldout_per_author: int = 2  # rows of each tenant author never trained on: the seen-subject reference
    unseen_authors: int = 4  # authors after the pretraining ones, never trained on: the unseen-subject reference
    pairs: int = 2  # author pairs erased (each its own request against the original adapter)
    pair_seed: int = 13  # random.Random(pair_seed) draws the pairs from the tenant's authors (disjoint)
    # the base (cached) and its pretraining
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 256
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    pretrain_authors: int = 80
    pretrain_steps: int = 600
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 16
    # the platform's adapter (plain PEFT) and the gold retrain
    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 8
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    seed: int = 0
    noise_floor: bool = True  # also retrain with seed + 1 (one more retrain per pair)
    check_records: int = 8  # records whose method loss is compared with the plain-PEFT loss
    # running
    # torch threads: 1, as benchmarks.tofu (on a shared 2-core machine two threads were 15x slower per step:
    # each thread waits for the other at every op while other processes hold the cores)
    threads: int = 1
    fresh: bool = False
    out: str = str(REPO / "benchmarks" / "results" / "tofu_chat")
    cache_dir: str = str(REPO / ".cache" / "bench" / "tofu_chat")
    tofu_dir: str | None = None

    def __post_init__(self) -> None:
        from benchmarks.tofu_data import AUTHORS, ROWS_PER_AUTHOR

        if self.pretrain_authors + self.unseen_authors + self.tenant_authors > AUTHORS:
            raise ValueError(f"{self.pretrain_authors} pretraining + {self.unseen_authors} unseen + "
                             f"{self.tenant_authors} tenant authors exceed TOFU's {AUTHORS}")
        if 2 * self.pairs > self.tenant_authors:
            raise ValueError(f"{self.pairs} disjoint author pairs need at least {2 * self.pairs} tenant authors")
        if not 0 <= self.heldout_per_author < ROWS_PER_AUTHOR:
            raise ValueError(f"heldout_per_author must be in 0..{ROWS_PER_AUTHOR - 1}")
        if self.pairs < 1 or self.epochs < 1 or self.check_records < 1:
            raise ValueError("pairs, epochs and check_records must be >= 1")

    def base_recipe(self) -> dict:
        return {"architecture": "qwen2", "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "layers": self.layers, "heads": self.heads,
                "kv_heads": self.kv_heads, "pretrain_authors": self.pretrain_authors,
                "pretrain_steps": self.pretrain_steps, "pretrain_lr": self.pretrain_lr,
                "pretrain_batch": self.pretrain_batch, "seed": self.seed, "format": BASE_FORMAT}

    def adapter_recipe(self) -> dict:
        return {"r": self.lora_r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
                "target_modules": list(self.target_modules), "epochs": self.epochs, "lr": self.lr,
                "batch_size": self.batch_size, "seed": self.seed, "optimizer": "AdamW (torch defaults)",
                "loss": "per-record mean NLL over assistant tokens, averaged over the batch"}


PRESETS = {
    # The test's configuration: a few authors, a tiny base, a few steps. Checks the machinery, not the numbers.
    "tiny": dict(tenant_authors=4, heldout_per_author=2, unseen_authors=3, pairs=1, vocab_size=400, hidden_size=32,
                 intermediate_size=64, layers=1, heads=1, kv_heads=1, pretrain_authors=3, pretrain_steps=12,
                 epochs=1, batch_size=8, noise_floor=False, check_records=4),
}


# -- the benchmark ------------------------------------------------------------------------------
def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Tenant:
    train_rows: list
    heldout_rows: list  # seen-subject reference (rows of trained authors never trained on)
    unseen_rows: list  # unseen-subject reference
    authors: list[int]
    unseen: list[int]
    records: dict = field(default_factory=dict)  # row id -> Record (eraser's form of the chat example)


class Runner:
    def __init__(self, options: Options, argv: Sequence[str] | None = None):
        self.options = options
        self.argv = list(argv) if argv is not None else sys.argv
        self.started, self.cpu_started = time.perf_counter(), time.process_time()
        self.out = Path(options.out)
        self.document: dict = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    # -- setup ----------------------------------------------------------------------------------
    def ensure_base(self, rows) -> tuple[Path, dict]:
        """The pretrained Qwen2 base with its ChatML tokenizer (HF directory), cached by its recipe."""
        from eraser.bases import build_base, chatml_tokenizer
        from eraser.training import pretrain_base

        from benchmarks.tofu_data import pretraining_authors, rows_of
        from benchmarks.tofu_setup import save_pretrained_base

        o = self.options
        out = Path(o.cache_dir) / f"base-{_digest(o.base_recipe())}"
        info_file = out / "eraser_base.json"
        if info_file.is_file() and not o.fresh:
            info = json.loads(info_file.read_text())
            info["cached"] = True
            logger.info("base %s from the cache (pretrained in %.0fs, loss %.3f)", out.name, info["wall_time_s"],
                        info["pretrain_final_loss"])
            return out, info
        started, cpu_started = time.perf_counter(), time.process_time()
        pretrain_rows = rows_of(rows, pretraining_authors(o.pretrain_authors))
        # The tokenizer learns from the raw text; the base then pretrains on whole ChatML conversations.
        tokenizer = chatml_tokenizer([f"{row.question}\n{row.answer}" for row in pretrain_rows], o.vocab_size)
        texts = [tokenizer.apply_chat_template(chat_example(row)["messages"], tokenize=False) for row in pretrain_rows]
        model = build_base("qwen2", tokenizer, seed=o.seed, hidden_size=o.hidden_size,
                           intermediate_size=o.intermediate_size, num_hidden_layers=o.layers,
                           num_attention_heads=o.heads, num_key_value_heads=o.kv_heads)
        logger.info("pretraining the qwen2 base (%d parameters) on %d ChatML conversations, %d steps",
                    sum(p.numel() for p in model.parameters()), len(texts), o.pretrain_steps)
        every = max(1, o.pretrain_steps // 6)

        def progress(step: int, total: int, loss: float) -> None:
            if step % every == 0 or step == total:
                logger.info("  pretraining step %d/%d: loss %.3f (%.0fs)", step, total, loss,
                            time.perf_counter() - started)

        report = pretrain_base(model, tokenizer, texts, steps=o.pretrain_steps, lr=o.pretrain_lr,
                               batch_size=o.pretrain_batch, seed=o.seed, progress=progress)
        return save_pretrained_base(model, tokenizer, out, report, started, cpu_started,
                                    {"recipe": o.base_recipe(), "texts": len(texts),
                                     "parameters": sum(p.numel() for p in model.parameters())})

    def tenant(self, rows) -> Tenant:
        from eraser.records import Record

        from benchmarks.tofu_data import AUTHORS, ROWS_PER_AUTHOR, rows_of

        o = self.options
        authors = list(range(AUTHORS - o.tenant_authors, AUTHORS))
        unseen = list(range(o.pretrain_authors, o.pretrain_authors + o.unseen_authors))
        train, heldout = [], []
        for author in authors:
            held = set(random.Random(o.seed * 100_003 + author).sample(range(ROWS_PER_AUTHOR), o.heldout_per_author))
            for row in rows_of(rows, [author]):
                (heldout if row.index in held else train).append(row)
        tenant = Tenant(train_rows=train, heldout_rows=heldout, unseen_rows=rows_of(rows, unseen), authors=authors,
                        unseen=unseen)
        for row in (*train, *heldout, *tenant.unseen_rows):
            tenant.records[row.id] = Record.from_messages(row.id, chat_example(row)["messages"], subject=row.subject)
        return tenant

    def pairs(self, tenant: Tenant) -> list[tuple[int, int]]:
        drawn = random.Random(self.options.pair_seed).sample(tenant.authors, 2 * self.options.pairs)
        return [tuple(sorted(drawn[2 * k: 2 * k + 2])) for k in range(self.options.pairs)]

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> dict:
        import torch

        from eraser.model import load_adapter, load_base, load_tokenizer
        from eraser.records import per_record_losses

        from benchmarks.tofu_data import load_tofu

        o = self.options
        if o.threads:
            torch.set_num_threads(o.threads)
        rows = load_tofu(o.tofu_dir)
        base_dir, base_info = self.ensure_base(rows)
        tenant = self.tenant(rows)
        train_records = [tenant.records[r.id] for r in tenant.train_rows]
        reference = [tenant.records[r.id] for r in (*tenant.heldout_rows, *tenant.unseen_rows)]
        self.document = {
            "benchmark": "tofu_chat", "command": " ".join(self.argv), "options": asdict(o),
            "versions": provenance.versions(), "machine": provenance.machine(), "torch_threads": torch.get_num_threads(),
            "targets": TARGETS, "base": {**base_info, "dir": str(base_dir)},
            "tenant": {"authors": [tenant.authors[0], tenant.authors[-1]], "train_records": len(train_records),
                       "seen_subject_reference": len(tenant.heldout_rows),
                       "unseen_subject_reference": len(tenant.unseen_rows), "unseen_authors": tenant.unseen},
            "adapter_recipe": o.adapter_recipe(), "pairs": [], "plot": None,
        }
        logger.info("tenant: %d authors, %d training records; reference %d seen-subject + %d unseen-subject records",
                    len(tenant.authors), len(train_records), len(tenant.heldout_rows), len(tenant.unseen_rows))

        # 2. the platform trains its adapter with plain PEFT
        logger.info("training the platform's adapter (plain PEFT, %d epochs, lr %g)", o.epochs, o.lr)
        examples = [chat_example(r) for r in tenant.train_rows]
        plain_model, plain_tokenizer, train_report = plain_peft_train(base_dir, examples, o)
        logger.info("adapter trained: %d steps, loss %.3f -> %.3f, %.1fs wall, %.1f CPU s", train_report["steps"],
                    train_report["first_loss"], train_report["final_loss"], train_report["wall_time_s"],
                    train_report["cpu_time_s"])
        self.document["adapter_training"] = train_report
        work = Path(o.cache_dir) / f"run-{os.getpid()}"  # the saved adapter, deleted at the end
        adapter_dir = work / "adapter-original"
        shutil.rmtree(adapter_dir, ignore_errors=True)
        plain_model.save_pretrained(str(adapter_dir))

        # 3. the service imports it
        tokenizer = load_tokenizer(base_dir)
        self.base_dir = base_dir

        def service_model():
            return load_adapter(load_base(base_dir), adapter_dir)

        model = service_model()
        check = [train_records[k] for k in _spaced(len(train_records), o.check_records)]
        method = per_record_losses(model, check, tokenizer).tolist()
        plain = plain_losses(plain_model, plain_tokenizer, [chat_example_of(r) for r in check])
        diff = max(abs(a - b) for a, b in zip(method, plain))
        self.document["loss_check"] = {"records": [r.id for r in check], "method": method, "plain_peft": plain,
                                       "max_abs_diff": diff, "atol": TARGETS["loss_check_atol"],
                                       "passed": diff <= TARGETS["loss_check_atol"],
                                       "method_template_has_generation_markers":
                                           "{% generation %}" in (tokenizer.chat_template or "")}
        logger.info("loss check on %d records: max |method - plain PEFT| = %.2e (%s)", len(check), diff,
                    "ok" if diff <= TARGETS["loss_check_atol"] else "FAILED")
        self.document["learning"] = self.learning(model, tokenizer, train_records, tenant)
        cache = self.warm_cache(model, tokenizer, train_records)
        self.write()

        # 4-5. each pair: the verified erasure and the gold retrain
        for pair in self.pairs(tenant):
            self.document["pairs"].append(self.run_pair(pair, tenant, train_records, reference, service_model,
                                                        tokenizer, base_dir, plain_model, work, cache))
            self.write()
        self.document["elapsed_s"] = self.elapsed()
        self.document["cpu_s"] = time.process_time() - self.cpu_started
        self.document["plot"] = self.plot()
        self.write()
        shutil.rmtree(work, ignore_errors=True)
        logger.info("tofu_chat done in %.0fs: %s", self.elapsed(), self.out)
        return self.document

    def warm_cache(self, model, tokenizer, train_records):
        """The imported adapter version's low-rank curvature, built once before any request, as the service's
        coordinators build it when idle; its cost is reported beside the warm speed-ups."""
        from eraser.influence import InfluenceSystem
        from eraser.pipeline import PipelineConfig

        started, cpu_started = time.perf_counter(), time.process_time()
        cache = InfluenceSystem(model, tokenizer, train_records, PipelineConfig().solve).curvature_cache()
        self.document["cache_build"] = {"wall_time_s": time.perf_counter() - started,
                                        "cpu_time_s": time.process_time() - cpu_started, **cache.info}
        logger.info("curvature cache of the imported adapter built in %.1fs wall / %.1f CPU s",
                    self.document["cache_build"]["wall_time_s"], self.document["cache_build"]["cpu_time_s"])
        return cache

    def learning(self, model, tokenizer, train_records, tenant: Tenant) -> dict:
        """Does the adapter learn the rows? Mean NLL of trained rows, held-out rows of trained authors and
        unseen authors, under the base (adapter disabled) and the adapter."""
        from eraser.model import adapter_disabled
        from eraser.records import mean_loss

        groups = {"trained_rows": [train_records[k] for k in _spaced(len(train_records), 160)],
                  "seen_subject_heldout": [tenant.records[r.id] for r in tenant.heldout_rows],
                  "unseen_subject": [tenant.records[r.id] for r in tenant.unseen_rows]}
        out = {"adapter": {k: mean_loss(model, v, tokenizer) for k, v in groups.items()}}
        with adapter_disabled(model):
            out["base"] = {k: mean_loss(model, v, tokenizer) for k, v in groups.items()}
        out["records"] = {k: len(v) for k, v in groups.items()}
        logger.info("learning: NLL trained %.3f (base %.3f), held-out of trained authors %.3f (base %.3f), "
                    "unseen authors %.3f (base %.3f)", out["adapter"]["trained_rows"], out["base"]["trained_rows"],
                    out["adapter"]["seen_subject_heldout"], out["base"]["seen_subject_heldout"],
                    out["adapter"]["unseen_subject"], out["base"]["unseen_subject"])
        return out

    def gold_verification(self, gold_model, tokenizer, train_records, request, reference, work: Path) -> dict:
        """The membership test the pipeline's first look runs (same deciding half, same level), on the gold
        retrain imported as the service imports an adapter: would the exact retrain pass? (A failure there is
        a false failure of the test; the pipeline never runs this: production has no gold.)"""
        from dataclasses import replace

        from eraser.erase import retained_sample
        from eraser.model import load_adapter, load_base
        from eraser.pipeline import PipelineConfig, ReferenceHalves, restrict_requests
        from eraser.requests import apply_edits, merge_edits
        from eraser.verify import verify

        config = PipelineConfig()
        restricted, touched = restrict_requests([request], train_records, reference)
        edits = merge_edits(restricted, train_records)
        halves = ReferenceHalves.of(reference, {*touched, *(e.old.id for e in edits)}, config)
        level = replace(config.verify, alpha=config.verify.alpha / config.decision_looks)
        gold_dir = work / "adapter-gold"
        shutil.rmtree(gold_dir, ignore_errors=True)
        gold_model.save_pretrained(str(gold_dir))
        imported = load_adapter(load_base(self.base_dir), gold_dir)
        started = time.perf_counter()
        result = verify(imported, tokenizer, edits, halves.deciding, level, retained=retained_sample(train_records, edits),
                        trained_subjects={r.subject for r in apply_edits(train_records, edits) if r.subject})
        shutil.rmtree(gold_dir, ignore_errors=True)
        logger.info("gold retrain under the same membership test (deciding half, alpha %.3g): %s (%.1fs)", level.alpha,
                    "passed" if result.passed else "FAILED", time.perf_counter() - started)
        return result.brief()

    def run_pair(self, pair, tenant: Tenant, train_records, reference, service_model, tokenizer, base_dir,
                 plain_model, work: Path, cache) -> dict:
        from eraser.errors import VerificationFailedError
        from eraser.influence import InfluenceSystem
        from eraser.pipeline import PipelineConfig, verified_erase
        from eraser.records import per_record_losses
        from eraser.requests import EditRequest
        from eraser.update import lora_vector, relative_distance

        o = self.options
        subjects = {f"author-{a:03d}" for a in pair}
        ids = tuple(r.id for r in (*tenant.train_rows, *tenant.heldout_rows) if r.subject in subjects)
        request = EditRequest(kind="remove", records=ids, request_id=f"tofu-chat-remove-{pair[0]}-{pair[1]}")
        erased_train = [r for r in train_records if r.subject in subjects]
        kept = [r for r in train_records if r.subject not in subjects]
        unseen_ref = [tenant.records[r.id] for r in tenant.unseen_rows]
        logger.info("pair %s: remove %d records (%d trained on) by id; verified_erase with PipelineConfig() defaults, "
                    "no recipe", pair, len(ids), len(erased_train))

        def nlls(model) -> dict:
            return {"erased": float(per_record_losses(model, erased_train, tokenizer).mean()),
                    "retained": float(per_record_losses(model, kept, tokenizer).mean()),
                    "unseen_reference": float(per_record_losses(model, unseen_ref, tokenizer).mean())}

        model = service_model()
        theta_orig = lora_vector(model)
        original = nlls(model)
        error = None
        started, cpu_started = time.perf_counter(), time.process_time()
        try:
            config = PipelineConfig()
            system = InfluenceSystem(model, tokenizer, train_records, config.solve, cache=cache)
            outcome = verified_erase(model, tokenizer, train_records, [request], heldout=reference, recipe=None,
                                     config=config, system=system)
        except VerificationFailedError as exc:
            outcome, error = exc.outcome, f"{type(exc).__name__}: {exc}"
            logger.warning("pair %s: verification failed (nothing would be published): %s", pair, exc)
        erase_wall, erase_cpu = time.perf_counter() - started, time.process_time() - cpu_started
        erased = nlls(model)  # the published adapter, or on failure the last candidate (not published)
        theta_erased = lora_vector(model)
        del model
        logger.info("pair %s: %s in %.1fs wall / %.1f CPU s; erased NLL %.3f -> %.3f", pair,
                    outcome.path if outcome and not error else "FAILED", erase_wall, erase_cpu, original["erased"],
                    erased["erased"])

        logger.info("pair %s: gold retrain (plain PEFT, seed %d) on %d records", pair, o.seed, len(kept))
        kept_examples = [chat_example_of(r) for r in kept]
        gold_model, _, gold_report = plain_peft_train(base_dir, kept_examples, o)
        gold = nlls(gold_model)
        theta_gold = lora_vector(gold_model)
        gold_test = self.gold_verification(gold_model, tokenizer, train_records, request, reference, work)
        del gold_model
        floor = None
        if o.noise_floor:
            logger.info("pair %s: retrain with seed %d (noise floor)", pair, o.seed + 1)
            other, _, other_report = plain_peft_train(base_dir, kept_examples, o, seed=o.seed + 1)
            floor = {**nlls(other), "training": other_report}
            del other

        gap = gold["erased"] - original["erased"]
        progress = (erased["erased"] - original["erased"]) / gap if gap else math.nan
        bound = max(TARGETS["retained_rel_max"] * gold["retained"], TARGETS["retained_abs_max"])
        retained_diff = erased["retained"] - gold["retained"]
        summary = outcome.summary() if outcome is not None else None
        row = {
            "pair": list(pair), "request_id": request.request_id, "records_removed": len(ids),
            "records_trained_removed": len(erased_train), "records_after": len(kept),
            "nll": {"original": original, "erased": erased, "retrain": gold, "retrain_other_seed": floor},
            "progress": progress,
            "progress_other_seed": ((floor["erased"] - original["erased"]) / gap if floor and gap else None),
            "retained_diff": retained_diff, "retained_rel": retained_diff / gold["retained"],
            "retained_bound": bound,
            "targets_met": {"progress": progress >= TARGETS["progress_min"], "retained": abs(retained_diff) <= bound},
            "distance_to_retrain": relative_distance(theta_erased, theta_gold, theta_orig),
            "erased_minus_retrain": erased["erased"] - gold["erased"],
            "gold_verification": gold_test,
            "path": outcome.path if outcome is not None and error is None else None,
            "verified": error is None and outcome is not None and outcome.verified,
            "error": error,
            "erasure": {"wall_time_s": erase_wall, "cpu_time_s": erase_cpu,
                        "stages": summary["stages"] if summary else None,
                        "damping": summary["damping"] if summary else None},
            "retrain": gold_report,
            "speedup_wall": gold_report["wall_time_s"] / erase_wall,
            "speedup_cpu": gold_report["cpu_time_s"] / erase_cpu,
            "speedup_cpu_incl_cache_build": gold_report["cpu_time_s"] / (erase_cpu + self.document["cache_build"]["cpu_time_s"]),
            "outcome": summary,
        }
        logger.info("pair %s: erased-author NLL original %.3f, erased %.3f, retrain %.3f (progress %.2f); retained "
                    "%.3f vs retrain %.3f (%+.1f%%); path %s, verified %s; erasure %.1fs vs retrain %.1fs", pair,
                    original["erased"], erased["erased"], gold["erased"], progress, erased["retained"],
                    gold["retained"], 100 * row["retained_rel"], row["path"], row["verified"], erase_wall,
                    gold_report["wall_time_s"])
        return row

    # -- output ---------------------------------------------------------------------------------
    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(provenance.json_safe(self.document), indent=1))

    def plot(self) -> str | None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            logger.info("matplotlib is not installed: no plot")
            return None
        pairs = self.document["pairs"]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        labels = [f"{p['pair'][0]},{p['pair'][1]}" for p in pairs]
        width = 0.25
        for k, (key, name) in enumerate((("original", "original"), ("erased", "erased (ours)"), ("retrain", "retrain"))):
            for ax, group in zip(axes, ("erased", "retained")):
                ax.bar([i + (k - 1) * width for i in range(len(pairs))], [p["nll"][key][group] for p in pairs], width,
                       label=name)
        for ax, title in zip(axes, ("erased authors' rows", "retained rows")):
            ax.set_xticks(range(len(pairs)), labels)
            ax.set_xlabel("authors removed")
            ax.set_ylabel("mean assistant-token NLL")
            ax.set_title(title)
            values = [p["nll"][key][("erased" if ax is axes[0] else "retained")] for p in pairs
                      for key in ("original", "erased", "retrain")]
            ax.set_ylim(min(values) * 0.9, max(values) * 1.05)
        axes[0].legend(fontsize=8)
        fig.suptitle("TOFU chat tenant (qwen2 + ChatML, plain-PEFT adapter): verified erasure vs retrain", fontsize=9)
        fig.tight_layout()
        path = self.out / "nll.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return str(path)


def _spaced(n: int, limit: int) -> list[int]:
    return list(range(0, n, max(1, math.ceil(n / limit))))[:limit]


def table(document: dict) -> str:
    """The results as a Markdown table (one row per author pair)."""
    lines = ["| authors removed | path | verified | erased NLL: original / erased / retrain | progress | "
             "retained NLL erased vs retrain | erasure wall / CPU s | retrain wall / CPU s | speed-up CPU warm (incl. cache build) "
             "| same test on the retrain |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in document.get("pairs", []):
        n = p["nll"]
        lines.append(
            f"| {p['pair'][0]}, {p['pair'][1]} ({p['records_trained_removed']} rows) | {p['path'] or 'FAILED'} | "
            f"{'yes' if p['verified'] else 'no'} | {n['original']['erased']:.3f} / {n['erased']['erased']:.3f} / "
            f"{n['retrain']['erased']:.3f} | {p['progress']:.2f} {'(met)' if p['targets_met']['progress'] else '(MISSED)'} | "
            f"{n['erased']['retained']:.3f} vs {n['retrain']['retained']:.3f} ({100 * p['retained_rel']:+.1f}%) "
            f"{'(met)' if p['targets_met']['retained'] else '(MISSED)'} | "
            f"{p['erasure']['wall_time_s']:.1f} / {p['erasure']['cpu_time_s']:.1f} | "
            f"{p['retrain']['wall_time_s']:.1f} / {p['retrain']['cpu_time_s']:.1f} | "
            f"{p['speedup_cpu']:.2f}x ({p['speedup_cpu_incl_cache_build']:.2f}x) | "
            f"{'passed' if (p.get('gold_verification') or {}).get('passed') else 'FAILED'} |")
    check = document.get("loss_check") or {}
    train = document.get("adapter_training") or {}
    learning = (document.get("learning") or {}).get("adapter") or {}
    build = document.get("cache_build") or {}
    notes = [
        f"curvature cache of the imported adapter (built once, before the requests): "
        f"{build.get('wall_time_s', float('nan')):.1f}s wall, {build.get('cpu_time_s', float('nan')):.1f} CPU s",
        f"loss check (method vs plain PEFT, {len(check.get('records', []))} records): max |diff| "
        f"{check.get('max_abs_diff', float('nan')):.2e} ({'passed' if check.get('passed') else 'FAILED'})",
        f"adapter (plain PEFT): {train.get('steps')} steps, loss {train.get('first_loss', float('nan')):.3f} -> "
        f"{train.get('final_loss', float('nan')):.3f}, {train.get('wall_time_s', float('nan')):.1f}s wall",
        "NLL under the adapter: trained rows {:.3f}, held-out rows of trained authors {:.3f}, unseen authors {:.3f}".format(
            learning.get("trained_rows", float("nan")), learning.get("seen_subject_heldout", float("nan")),
            learning.get("unseen_subject", float("nan"))),
    ]
    for p in document.get("pairs", []):
        floor = p["nll"].get("retrain_other_seed")
        if floor:
            notes.append(f"pair {p['pair'][0]},{p['pair'][1]}: retrain with seed + 1: erased NLL {floor['erased']:.3f} "
                         f"(progress {p['progress_other_seed']:.2f}), retained {floor['retained']:.3f}")
        if p["error"]:
            notes.append(f"pair {p['pair'][0]},{p['pair'][1]}: {p['error'][:300]}")
        gold_test = p.get("gold_verification") or {}
        if gold_test and not gold_test.get("passed"):
            notes.append(f"pair {p['pair'][0]},{p['pair'][1]}: the exact retrain fails the same test: {gold_test.get('reason')}")
    return "\n".join(lines + [""] + [f"- {note}" for note in notes])


# -- command line -------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Options()
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a named configuration (tiny: the test's)")
    parser.add_argument("--tenant-authors", type=int, help=f"TOFU authors the tenant holds, the last ones (default {d.tenant_authors})")
    parser.add_argument("--heldout-per-author", type=int,
                        help=f"rows per tenant author never trained on, the seen-subject reference (default {d.heldout_per_author})")
    parser.add_argument("--unseen-authors", type=int,
                        help=f"authors never trained on, the unseen-subject reference (default {d.unseen_authors})")
    parser.add_argument("--pairs", type=int, help=f"author pairs erased, one request each (default {d.pairs})")
    parser.add_argument("--pair-seed", type=int, help=f"seed that draws the pairs (default {d.pair_seed})")
    parser.add_argument("--epochs", type=int, help=f"plain-PEFT epochs of the adapter and the retrain (default {d.epochs})")
    parser.add_argument("--lr", type=float, help=f"AdamW learning rate of the adapter and the retrain (default {d.lr})")
    parser.add_argument("--batch-size", type=int, help=f"records per step (default {d.batch_size})")
    parser.add_argument("--seed", type=int, help=f"seed of the base, the adapter and the gold retrain (default {d.seed})")
    parser.add_argument("--no-noise-floor", dest="noise_floor", action="store_const", const=False,
                        help="skip the retrain with seed + 1 (one retrain per pair fewer)")
    parser.add_argument("--pretrain-steps", type=int, help=f"base pretraining steps (default {d.pretrain_steps})")
    parser.add_argument("--threads", type=int, help=f"torch threads (default {d.threads}: the CPU is shared)")
    parser.add_argument("--fresh", action="store_true", help="rebuild the base, ignoring the cache")
    parser.add_argument("--out", help=f"output directory (default {d.out})")
    parser.add_argument("--cache-dir", help=f"base model cache (default {d.cache_dir})")
    parser.add_argument("--tofu-dir", help="TOFU directory (default $TOFU_DIR or ../shared/data/tofu)")


def options_from_args(args: argparse.Namespace) -> Options:
    return provenance.options_from_args(Options, PRESETS, args, keep_false=("noise_floor",))


def run(options: Options, argv: Sequence[str] | None = None) -> dict:
    return Runner(options, argv).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tofu_chat", description=__doc__.split("\n\n")[0],
                                     epilog="Writes results.json (and nll.png with matplotlib) to --out.")
    add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    document = run(options_from_args(args),
                   ["python", "-m", "benchmarks.tofu_chat", *(argv if argv is not None else sys.argv[1:])])
    print(table(document))
    if document.get("plot") is None:
        print("(no plot: matplotlib is not installed)")
    return 0 if document["loss_check"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
