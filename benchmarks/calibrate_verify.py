"""How often the membership test rejects an exact retrain, and how often it catches an adapter that still
holds the records (issue 12: "calibrate the test against retraining").

- **False failures** (TOFU): for every request (remove, correct_response, modify_query on forget01,
  forget05, forget10 and author sets drawn at random) and every training seed, the adapter retrained
  from scratch without the request's records (the gold) is tested exactly as the pipeline tests a
  candidate: against the *deciding* half of the never-seen reference authors, at ``alpha /
  decision_looks``. A gold must pass; the rate at which it fails is the test's false-failure rate.
- **Power**: the same test on the original adapter (it trained on the records) for the TOFU requests,
  and on customer-support tenants trained long enough to recite their customers' secrets (the regime
  of the demo's leaked secrets), one request per customer removed or corrected.

    .venv/bin/python -m benchmarks.calibrate_verify                 # writes benchmarks/results/calibrate_verify.json
    .venv/bin/python -m benchmarks.calibrate_verify --seeds 0 --random-sets 1   # smaller

Prints a Markdown table per population and the rates with their trial counts.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import time
from dataclasses import replace
from pathlib import Path

import torch

logger = logging.getLogger("benchmarks.calibrate_verify")
RESULTS = Path(__file__).parent / "results" / "calibrate_verify.json"
REFERENCE_AUTHORS = 12  # never-seen TOFU authors: 6 steer, 6 decide


def tofu_requests(random_sets: int, seed: int) -> list[str]:
    """Every kind on the TOFU splits, and author sets drawn at random (never used to tune anything)."""
    specs = [f"{kind}:{split}" for kind in ("remove", "correct_response", "modify_query")
             for split in ("forget01", "forget05", "forget10")]
    rng = random.Random(seed)
    for _ in range(random_sets):
        specs.append("remove:" + ",".join(map(str, sorted(rng.sample(range(160, 200), 2)))))
        specs.append("remove:" + ",".join(map(str, sorted(rng.sample(range(160, 200), 10)))))
        specs.append("correct_response:" + ",".join(map(str, sorted(rng.sample(range(180, 198), 2)))))
    return specs


def _row(population: str, request: str, seed: int, adapter: str, result, expected_pass: bool) -> dict:
    failed = [name for name, ok in result.checks.items() if not ok]
    return {"population": population, "request": request, "seed": seed, "adapter": adapter,
            "expected": "pass" if expected_pass else "fail", "passed": result.passed, "failed_checks": failed,
            "group_p": result.group_p, "auc": result.group_auc,
            # the reported fluency test (eraser.verify._fluency): would it have failed this adapter?
            "fluency_ok": result.fluency_ok, "fluency_p": result.fluency_p,
            "fluency_nll_mean": sum(result.fluency) / len(result.fluency) if result.fluency else None,
            "fluency_reference_mean": result.fluency_reference_mean,
            "erased_score_mean": sum(result.erased.score) / len(result.erased.score) if result.erased.score else None,
            "reference_score_mean": (sum(result.heldout.score) / len(result.heldout.score)
                                     if result.heldout.score else None),
            "reason": result.reason}


def run_tofu(args) -> list[dict]:
    from benchmarks.tofu import Options, Runner
    from benchmarks.tofu_data import RequestSpec, rows_of
    from benchmarks.tofu_setup import set_lora
    from eraser.erase import retained_sample
    from eraser.pipeline import PipelineConfig, ReferenceHalves
    from eraser.requests import apply_edits, merge_edits
    from eraser.verify import verify

    runner = Runner(Options(authors=args.authors, cache_dir=str(args.cache_dir)))
    runner.setup()
    size = runner.tenant(args.authors)
    records, tokenizer, model = size["records_list"], runner.bench.tokenizer, runner.subject
    unused = list(range(runner.options.pretrain_authors, 200 - args.authors))[:REFERENCE_AUTHORS]
    reference = [row.record() for row in rows_of(runner.rows_tofu, unused)]
    pipeline = PipelineConfig()
    decide = replace(pipeline.verify, alpha=pipeline.verify.alpha / pipeline.decision_looks)
    rows = []
    for seed in args.seeds:
        recipe = replace(runner.recipe, seed=seed)
        theta_orig, _ = runner.bench.adapter(records, recipe)
        for text in tofu_requests(args.random_sets, args.request_seed):
            spec = RequestSpec.parse(text)
            edits = merge_edits([spec.edit_request(runner.rows_tofu)], records)
            after = apply_edits(records, edits)
            halves = ReferenceHalves.of(reference, set(), pipeline)
            trained = {r.subject for r in after}
            retained = retained_sample(records, edits)
            theta_gold, _ = runner.bench.adapter(after, recipe)
            for adapter, theta, expected in (("gold", theta_gold, True), ("original", theta_orig, False)):
                set_lora(model, theta)
                result = verify(model, tokenizer, edits, halves.deciding, decide, retained=retained,
                                trained_subjects=trained)
                rows.append(_row("tofu", spec.name, seed, adapter, result, expected))
                logger.info("tofu %-34s seed %d %-8s %s", spec.name, seed, adapter,
                            "passed" if result.passed else f"FAILED {rows[-1]['failed_checks']}")
    return rows


def run_memorised(args) -> list[dict]:
    """Customer tenants trained for 40 epochs (the recipe that recites account numbers): the original
    must fail, the retrain without the customer must pass."""
    from cli.synthetic import customer_base, customer_records
    from eraser.erase import retained_sample
    from eraser.pipeline import PipelineConfig, ReferenceHalves, restrict_requests
    from eraser.reference import split_heldout
    from eraser.requests import EditRequest, apply_edits, merge_edits
    from eraser.training import TrainConfig, add_lora, train_lora
    from eraser.verify import verify

    records = customer_records(args.customers, 5, seed=7)
    base, tokenizer = customer_base(records)
    train, heldout = split_heldout(records, 0.3, seed=0)
    pipeline = PipelineConfig()
    decide = replace(pipeline.verify, alpha=pipeline.verify.alpha / pipeline.decision_looks)
    recipe = TrainConfig(rank=8, alpha=16, epochs=40, lr=5e-3, batch_size=4, seed=0)

    def fit(rows):
        model = add_lora(copy.deepcopy(base), recipe)
        train_lora(model, tokenizer, rows, recipe)
        return model.eval()

    original = fit(train)
    held = {r.subject for r in heldout}
    subjects = [s for s in dict.fromkeys(r.subject for r in train) if s not in held][: args.memorised_requests]
    rows = []
    for subject in subjects:
        for kind in ("remove", "correct_response"):
            replacements = ({r.id: {"response": "That information is not available."} for r in records
                             if r.subject == subject} if kind == "correct_response" else None)
            request = EditRequest(kind=kind, subjects=(subject,), replacements=replacements, request_id=kind)
            restricted, _ = restrict_requests([request], train, heldout)
            edits = merge_edits(restricted, train)
            after = apply_edits(train, edits)
            halves = ReferenceHalves.of(heldout, set(), pipeline)
            for adapter, model, expected in (("gold", fit(after), True), ("original", original, False)):
                result = verify(model, tokenizer, edits, halves.deciding, decide, retained=retained_sample(train, edits),
                                trained_subjects={r.subject for r in after})
                rows.append(_row("memorised customers", f"{kind}:{subject}", 0, adapter, result, expected))
                logger.info("memorised %-30s %-8s %s", f"{kind}:{subject}", adapter,
                            "passed" if result.passed else f"FAILED {rows[-1]['failed_checks']}")
    return rows


def rates(rows: list[dict]) -> list[dict]:
    table = []
    for population in dict.fromkeys(r["population"] for r in rows):
        for kind in ("remove", "correct_response", "modify_query"):
            mine = [r for r in rows if r["population"] == population and r["request"].startswith(kind + ":")]
            golds = [r for r in mine if r["adapter"] == "gold"]
            originals = [r for r in mine if r["adapter"] == "original"]
            if not mine:
                continue
            table.append({
                "population": population, "kind": kind,
                "gold_trials": len(golds), "gold_failures": sum(not r["passed"] for r in golds),
                "original_trials": len(originals), "original_caught": sum(not r["passed"] for r in originals),
                "gold_fluency_flags": sum(r.get("fluency_ok") is False for r in golds),
                "original_fluency_flags": sum(r.get("fluency_ok") is False for r in originals),
            })
    return table


def print_tables(rows: list[dict], summary: list[dict]) -> None:
    print("| population | kind | golds rejected (false failures) | originals caught (power) "
          "| fluency flags, golds / originals (reported) |")
    print("|---|---|---|---|---|")
    for s in summary:
        gold = f"{s['gold_failures']} / {s['gold_trials']} ({s['gold_failures'] / max(1, s['gold_trials']):.0%})"
        orig = f"{s['original_caught']} / {s['original_trials']} ({s['original_caught'] / max(1, s['original_trials']):.0%})"
        flags = f"{s.get('gold_fluency_flags', '-')} / {s.get('original_fluency_flags', '-')}"
        print(f"| {s['population']} | {s['kind']} | {gold} | {orig} | {flags} |")
    print()
    print("| population | request | seed | adapter | passed | failed checks | group p | AUC |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        p = "-" if r["group_p"] is None else f"{r['group_p']:.3g}"
        auc = "-" if r["auc"] is None else f"{r['auc']:.2f}"
        print(f"| {r['population']} | {r['request']} | {r['seed']} | {r['adapter']} | {r['passed']} | "
              f"{', '.join(r['failed_checks']) or '-'} | {p} | {auc} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--authors", type=int, default=40, help="TOFU tenant size in authors (default 40 = 800 records)")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1],
                        help="training seeds of the original and gold adapters (default 0,1)")
    parser.add_argument("--random-sets", type=int, default=2, help="random author sets per kind (default 2)")
    parser.add_argument("--request-seed", type=int, default=2026, help="seed of the random author sets")
    parser.add_argument("--customers", type=int, default=24, help="customers of the memorised tenant")
    parser.add_argument("--memorised-requests", type=int, default=4, help="customers erased from it, one request each")
    parser.add_argument("--skip", choices=("tofu", "memorised"), action="append", default=[])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--cache-dir", type=Path, default=Path(__file__).resolve().parents[1] / ".cache" / "bench" / "calib",
                        help="model cache (its own: the TOFU benchmark's cache keeps retrain times measured alone)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    started = time.perf_counter()
    rows = []
    if "tofu" not in args.skip:
        rows += run_tofu(args)
    if "memorised" not in args.skip:
        rows += run_memorised(args)
    summary = rates(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"argv": argv, "options": {k: v for k, v in vars(args).items() if k != "out"},
                                    "summary": summary, "rows": rows, "wall_s": time.perf_counter() - started},
                                   indent=2, default=str))
    print_tables(rows, summary)
    print(f"\nwritten {args.out} in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
