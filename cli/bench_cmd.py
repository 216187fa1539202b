"""`eraser bench tofu`: the TOFU fidelity and speed benchmark (benchmarks/tofu.py)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks (TOFU: fidelity to retraining, speed-up)")
    suites = bench.add_subparsers(dest="suite", metavar="SUITE", required=True)
    tofu = suites.add_parser(
        "tofu",
        help="erase/correct TOFU authors from a LoRA adapter and compare every method with retraining",
        description="Build (or reuse from the cache) a small pretrained base and a tenant adapter trained on TOFU, "
        "apply each request with each method, compare with the gold retrain, and write results.json, "
        "results.md and plots to --out. Same as `python -m benchmarks.tofu`.",
    )
    from benchmarks.tofu import add_arguments

    add_arguments(tofu)
    tofu.set_defaults(handler=run_tofu)


def run_tofu(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from benchmarks.tofu import options_from_args, run

    options = options_from_args(args)
    document = run(options, ["eraser", *sys.argv[1:]])
    print((Path(options.out) / "results.md").read_text())
    failed = [row for row in document["rows"] if row.get("error")]
    return 1 if failed else 0
