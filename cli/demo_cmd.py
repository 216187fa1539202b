"""`eraser demo`: the whole product on embedded defaults (see cli/demo/ for the steps)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="run the end-to-end demo (local Ray, embedded S3, small local model)",
        description="Build a small base model, create three tenants with synthetic customer records, train "
        "their adapters with Ray Train, serve them with Ray Serve + vLLM, erase one customer over HTTP while "
        "a client keeps querying, and compare with retraining. Takes about 10 minutes on 2 cores.",
    )
    demo.add_argument("--workdir", type=Path, default=Path("demo-run"), help="where everything is written (default ./demo-run)")
    demo.add_argument("--reduced", action="store_true", help="the small configuration the CI test runs")
    demo.add_argument("--port", type=int, default=8000, help="HTTP port of the service (default 8000)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import shutil

    from cli.demo import DemoConfig, run_demo

    if args.workdir.exists():
        shutil.rmtree(args.workdir)  # a demo run starts from nothing
    config = DemoConfig.reduced(args.workdir, port=args.port) if args.reduced else DemoConfig(workdir=args.workdir, port=args.port)
    config = dataclasses.replace(config, seed=args.seed)
    report = run_demo(config)
    failed = [step.name for step in report.steps if not step.ok]
    if failed:
        print(f"\ndemo: {len(failed)} step(s) failed: {failed}")
        return 1
    print("\ndemo: every step passed")
    return 0
