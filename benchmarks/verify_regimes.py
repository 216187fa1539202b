"""Which path does a verified erasure take, per regime, and how close does it land to retraining?

Issue 8's table, from the product's own code: for a random or pretrained base and LoRA trained for
3 / 10 / 40 epochs (from a small adaptation to memorised secrets), erase one customer's records and
compare with the adapter retrained without them (the gold, same recipe and seed):

- ``influence@d``: the bare influence update (Gauss-Newton, CG) at relative damping d;
- ``verified``: :func:`eraser.pipeline.verified_erase` with its defaults (the path it took);
- ``gold seed 1``: a retrain with another seed (the noise floor of "as far as retraining").

Columns: ``progress`` = how far the erased records' NLL moved from the original toward the gold's
(1 = as far as retraining); ``retained`` = NLL on the retained records (gold's in brackets); the
membership test (passed / which checks failed), its group p-value and attack AUC; seconds.

    .venv/bin/python -m benchmarks.verify_regimes                      # the default grid
    .venv/bin/python -m benchmarks.verify_regimes --bases pretrained --epochs 3 --dampings 0.03

Writes ``benchmarks/results/verify_regimes.json`` (or ``--out``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cli.synthetic import customer_base, customer_records
from eraser.errors import EraserError, VerificationFailedError
from eraser.erase import erase, retained_sample
from eraser.influence import SolveConfig
from eraser.metrics import nll_progress
from eraser.pipeline import PipelineConfig, ReferenceHalves, restrict_requests, verified_erase
from eraser.records import per_record_losses
from eraser.requests import EditRequest, apply_edits, merge_edits
from eraser.training import TrainConfig, add_lora, train_lora
from eraser.reference import split_heldout
from eraser.verify import verify

logger = logging.getLogger("benchmarks.verify_regimes")
RESULTS = Path(__file__).parent / "results"


def build_base(pretrain_steps: int, records, hidden: int):
    return customer_base(records, pretrain_steps=pretrain_steps, hidden=hidden)


def train(base, tokenizer, records, recipe: TrainConfig):
    model = add_lora(copy.deepcopy(base), recipe)
    started = time.perf_counter()
    report = train_lora(model, tokenizer, records, recipe)
    return model.eval(), time.perf_counter() - started, report.final_loss


def mean_nll(model, records, tokenizer) -> float:
    return float(per_record_losses(model, records, tokenizer).mean())


def test_row(result) -> dict:
    failed = [name for name, ok in result.checks.items() if not ok]
    return {"passed": result.passed, "verifiable": result.verifiable, "failed": failed,
            "group_p": result.group_p, "auc": result.group_auc, "exposure_max": result.exposure_max}


def run_regime(base_name: str, base, tokenizer, records, epochs: int, args) -> list[dict]:
    train_set, heldout = split_heldout(records, args.heldout_fraction, seed=0)
    held_subjects = {r.subject for r in heldout}
    subjects = [r.subject for r in train_set if r.subject not in held_subjects]
    subject = subjects[-1] if subjects else train_set[-1].subject
    request = EditRequest(kind="remove", subjects=(subject,), request_id=f"bench-{base_name}-{epochs}")
    restricted, _ = restrict_requests([request], train_set, heldout)
    edits = merge_edits(restricted, train_set)
    erased = [e.old for e in edits]
    kept = apply_edits(train_set, edits)
    retained = retained_sample(train_set, edits)
    recipe = TrainConfig(rank=8, alpha=16, epochs=epochs, lr=args.lr, batch_size=4, seed=0)

    original, train_s, final_loss = train(base, tokenizer, train_set, recipe)
    gold, gold_s, _ = train(base, tokenizer, kept, recipe)
    gold_seed1, _, _ = train(base, tokenizer, kept, TrainConfig(**{**recipe.to_dict(), "seed": 1}))
    before, target = mean_nll(original, erased, tokenizer), mean_nll(gold, erased, tokenizer)
    gold_retained = mean_nll(gold, retained, tokenizer)
    regime = {"base": base_name, "epochs": epochs, "train_loss": final_loss, "records": len(train_set),
              "heldout": len(heldout), "erased": len(erased), "retrain_s": gold_s,
              "erased_nll_original": before, "erased_nll_gold": target, "retained_nll_gold": gold_retained}
    rows = []

    pipeline = PipelineConfig()
    halves = ReferenceHalves.of(heldout, {e.old.id for e in edits}, pipeline)
    decide = replace(pipeline.verify, alpha=pipeline.verify.alpha / pipeline.decision_looks)
    trained_subjects = {r.subject for r in kept}

    def row(method: str, model, seconds: float, **extra) -> dict:
        after = mean_nll(model, erased, tokenizer)
        # the test as the pipeline decides with it: the deciding half, alpha / decision looks
        test = verify(model, tokenizer, edits, halves.deciding, decide, retained=retained,
                      trained_subjects=trained_subjects)
        entry = {**regime, "method": method, "progress": nll_progress(before, after, target), "erased_nll": after,
                 "gap_to_gold": after - target,
                 "retained_nll": mean_nll(model, retained, tokenizer), "seconds": seconds, "test": test_row(test),
                 **extra}
        rows.append(entry)
        logger.info("%s %d epochs %s: progress %.2f, retained %.4f (gold %.4f), test %s, %.1fs", base_name, epochs,
                    method, entry["progress"], entry["retained_nll"], gold_retained,
                    "passed" if test.passed else test.reason, seconds)
        return entry

    row("original", original, 0.0)
    row("gold seed 1 (noise floor)", gold_seed1, gold_s)
    for damping in args.dampings:
        model = copy.deepcopy(original)
        started = time.perf_counter()
        try:
            result = erase(model, tokenizer, train_set, restricted,
                           SolveConfig(damping=damping, power_iters=args.power_iters))
        except EraserError as error:
            rows.append({**regime, "method": f"influence@{damping:g}", "error": str(error)})
            continue
        row(f"influence@{damping:g}", model, time.perf_counter() - started,
            iterations=result.report.iterations)
    model = copy.deepcopy(original)
    started = time.perf_counter()
    config = PipelineConfig()  # what the service runs
    try:
        outcome = verified_erase(model, tokenizer, train_set, [request], heldout, recipe=recipe, config=config,
                                 base_factory=lambda: copy.deepcopy(base))
        row(f"verified -> {outcome.path}", model, time.perf_counter() - started, path=outcome.path,
            stages=outcome.stages, damping_attempts=outcome.attempts,
            damping=outcome.damping, reference=outcome.reference,
            remediation_steps=outcome.remediation.steps if outcome.remediation else None)
    except VerificationFailedError as error:
        rows.append({**regime, "method": "verified", "error": str(error)})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| base | epochs (train loss) | method | progress | erased NLL - gold's | retained NLL (gold) | test "
             "| group p / AUC | s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['base']} | {r['epochs']} | {r['method']} | error: {r['error'][:80]} | | | | | |")
            continue
        test = r["test"]
        verdict = "passed" if test["passed"] else "FAIL " + ",".join(test["failed"])
        p = "-" if test["group_p"] is None else f"{test['group_p']:.3g} / {test['auc']:.2f}"
        lines.append(f"| {r['base']} | {r['epochs']} ({r['train_loss']:.3f}) | {r['method']} | {r['progress']:.2f} | "
                     f"{r['gap_to_gold']:+.3f} | {r['retained_nll']:.3f} ({r['retained_nll_gold']:.3f}) | {verdict} | {p} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bases", nargs="+", default=["pretrained", "random"], choices=("pretrained", "random"))
    parser.add_argument("--epochs", nargs="+", type=int, default=[3, 10, 40])
    parser.add_argument("--dampings", nargs="+", type=float, default=[0.003, 0.01, 0.03, 0.1])
    parser.add_argument("--customers", type=int, default=16, help="5 records each")
    parser.add_argument("--heldout-fraction", type=float, default=0.4,
                        help="held-out share (mixed unit: half whole customers, half single records)")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--power-iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "verify_regimes.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    records = customer_records(args.customers, 5, seed=3)
    rows: list[dict] = []
    started = time.perf_counter()
    for base_name in args.bases:
        base, tokenizer = build_base(args.pretrain_steps if base_name == "pretrained" else 0, records, args.hidden)
        for epochs in args.epochs:
            rows += run_regime(base_name, base, tokenizer, records, epochs, args)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                            "rows": rows, "wall_time_s": time.perf_counter() - started},
                                           indent=1, default=lambda v: None if isinstance(v, float) and not np.isfinite(v) else str(v)))
    print(table(rows))
    print(f"\nwritten {args.out} ({time.perf_counter() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
