"""`eraser erase`: apply an erasure request to an adapter offline and write the new adapter."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path


def add_solver_arguments(parser: argparse.ArgumentParser) -> None:
    from eraser.influence import SolveConfig

    defaults = SolveConfig()
    parser.add_argument("--solver", choices=("cg", "sgd", "lissa"), default=defaults.solver,
                        help=f"inverse-HVP solver (default {defaults.solver})")
    parser.add_argument("--curvature", choices=("ggn", "hessian"), default=defaults.curvature,
                        help=f"Gauss-Newton (PSD) or exact Hessian (default {defaults.curvature})")
    parser.add_argument("--damping", type=float, default=defaults.damping,
                        help=f"lambda, as a fraction of the top curvature eigenvalue (default {defaults.damping})")
    parser.add_argument("--absolute-damping", action="store_true", help="--damping is an absolute lambda")
    parser.add_argument("--tol", type=float, default=None, help="relative residual target (default: per solver)")
    parser.add_argument("--max-iters", type=int, default=defaults.max_iters)
    parser.add_argument("--hvp-batch-size", type=int, default=defaults.batch_size, help="records per stochastic HVP")
    parser.add_argument("--eval-size", type=int, default=defaults.eval_size, help="records in the residual/CG batch")
    parser.add_argument("--seed", type=int, default=defaults.seed)


def solve_config_from_args(args: argparse.Namespace):
    from eraser.influence import SolveConfig

    return SolveConfig(solver=args.solver, curvature=args.curvature, damping=args.damping,
                       damping_mode="absolute" if args.absolute_damping else "relative", tol=args.tol,
                       max_iters=args.max_iters, batch_size=args.hvp_batch_size, eval_size=args.eval_size,
                       seed=args.seed)


def register(subparsers) -> None:
    erase = subparsers.add_parser(
        "erase",
        help="erase/correct records from an adapter (influence update), offline",
        description="Compute the adapter that training without (or with corrected) records would have "
        "produced, by the LLMEraser influence update theta + (H + lambda I)^-1 b, and write it with "
        "eraser.json. Nothing is written when the request is invalid or the solve fails.",
    )
    erase.add_argument("--base", required=True, type=Path, help="base model directory (HF format)")
    erase.add_argument("--adapter", required=True, type=Path, help="the adapter to update (PEFT directory)")
    erase.add_argument("--data", required=True, type=Path, help="the adapter's training records (.jsonl)")
    erase.add_argument("--request", required=True, type=Path,
                       help="erasure request JSON (one object, or a list of them applied together)")
    erase.add_argument("--out", required=True, type=Path, help="new adapter directory (must not exist)")
    add_solver_arguments(erase)
    erase.set_defaults(handler=run_erase)


def read_requests(path: Path):
    from eraser.requests import EditRequest

    if not path.is_file():
        raise FileNotFoundError(f"request file not found: {path}")
    body = json.loads(path.read_text(encoding="utf-8"))
    return [EditRequest.from_json(obj) for obj in (body if isinstance(body, list) else [body])]


def run_erase(args: argparse.Namespace) -> int:
    from cli.main import CommandError
    from cli.progress import residual_bar
    from eraser.erase import erase
    from eraser.model import load_adapter, load_base, load_tokenizer
    from eraser.records import load_records
    from eraser.update import read_manifest, save_adapter

    if args.out.exists() and any(args.out.iterdir()):
        raise CommandError(f"--out {args.out} exists and is not empty; adapter versions are immutable")
    config = solve_config_from_args(args)
    requests = read_requests(args.request)
    records = load_records(args.data)
    tokenizer = load_tokenizer(args.base)
    model = load_adapter(load_base(args.base), args.adapter)
    with residual_bar(f"{config.solver} solve", total=config.max_iters) as bar:
        result = erase(model, tokenizer, records, requests, config, progress=bar)
    parent = read_manifest(args.adapter)
    manifest = {
        "version": None,
        "parent_version": parent.get("version"),
        "request_ids": [r.request_id for r in requests],
        "records_affected": [edit.old.id for edit in result.edits],
        "solver": {**result.report.to_dict(), "config": config.to_dict()},
        "checks": result.checks,
        "stages": result.stages,
        "path": "influence",
    }
    with tempfile.TemporaryDirectory(dir=args.out.parent if args.out.parent.exists() else None) as staging:
        save_adapter(model, Path(staging) / "adapter", manifest)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.out.exists():
            args.out.rmdir()
        shutil.move(str(Path(staging) / "adapter"), str(args.out))
    print_summary(result, args.out)
    return 0


def print_summary(result, out: Path) -> None:
    report, checks = result.report, result.checks
    print(f"solver      {report.solver} ({report.extra.get('curvature')}), {report.iterations} iterations, "
          f"{report.hvps} HVP batches, {report.wall_time_s:.2f}s")
    print(f"residual    {report.relative_residual:.2e} (tol {report.tol:g}), damping {report.damping:.3g}")
    print(f"affected    {len(result.edits)} record(s): loss {checks['affected_loss_before']:.4f} -> {checks['affected_loss_after']:.4f}")
    if checks.get("retained_loss_before") is not None:
        print(f"retained    loss {checks['retained_loss_before']:.4f} -> {checks['retained_loss_after']:.4f}")
    if "replacement_loss_before" in checks:
        print(f"replacement loss {checks['replacement_loss_before']:.4f} -> {checks['replacement_loss_after']:.4f}")
    print(f"written     {out}")
