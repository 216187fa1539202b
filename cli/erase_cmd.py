"""`eraser erase`: apply an erasure request to an adapter offline and write the new adapter."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path


from cli.train_cmd import (
    add_format_arguments,
    add_precision_arguments,
    format_from_args,
    format_manifest,
    precision_from_args,
    precision_manifest,
)


def add_solver_arguments(parser: argparse.ArgumentParser) -> None:
    from eraser.influence import SolveConfig
    from eraser.pipeline import PipelineConfig
    from eraser.solvers import SOLVERS

    defaults = PipelineConfig().solve  # the verified pipeline's measured defaults
    parser.add_argument("--solver", choices=SOLVERS, default=defaults.solver,
                        help=f"inverse-HVP solver; eigen: the adapter's cached low-rank curvature (its Woodbury "
                        f"solution, refined by preconditioned CG when --max-iters > 0) (default {defaults.solver})")
    parser.add_argument("--curvature", choices=("ggn", "hessian"), default=defaults.curvature,
                        help=f"Gauss-Newton (PSD) or exact Hessian (default {defaults.curvature})")
    parser.add_argument("--damping", type=float, default=defaults.damping,
                        help=f"lambda, as a fraction of the top curvature eigenvalue, where it is not searched "
                        f"(--no-damping-search, another solver, or nothing to steer by) (default {defaults.damping})")
    parser.add_argument("--no-damping-search", action="store_true",
                        help="use --damping as given instead of choosing it per request on the steering half "
                        "of the held-out records (the search needs --solver eigen --max-iters 0, the default)")
    parser.add_argument("--absolute-damping", action="store_true", help="--damping is an absolute lambda")
    parser.add_argument("--tol", type=float, default=None, help="relative residual target (default: per solver)")
    parser.add_argument("--max-iters", type=int, default=None,
                        help=f"solver iterations (eigen: CG refinement steps, 0 keeps the low-rank solution) "
                        f"(default: {defaults.max_iters} for eigen, {SolveConfig().max_iters} for the others)")
    parser.add_argument("--hvp-batch-size", type=int, default=defaults.batch_size, help="records per stochastic HVP")
    parser.add_argument("--eval-size", type=int, default=defaults.eval_size, help="records in the residual/CG batch")
    parser.add_argument("--seed", type=int, default=defaults.seed)


def default_max_iters(solver: str) -> int:
    """The pipeline's for eigen (0: the bare low-rank solution), SolveConfig's for the iterative solvers."""
    from eraser.influence import SolveConfig
    from eraser.pipeline import PipelineConfig

    return PipelineConfig().solve.max_iters if solver == "eigen" else SolveConfig().max_iters


def solve_config_from_args(args: argparse.Namespace):
    from eraser.influence import SolveConfig

    return SolveConfig(solver=args.solver, curvature=args.curvature, damping=args.damping,
                       damping_mode="absolute" if args.absolute_damping else "relative", tol=args.tol,
                       max_iters=args.max_iters if args.max_iters is not None else default_max_iters(args.solver), batch_size=args.hvp_batch_size, eval_size=args.eval_size,
                       seed=args.seed)


def register(subparsers) -> None:
    erase = subparsers.add_parser(
        "erase",
        help="erase/correct records from an adapter (verified influence update), offline",
        description="Compute the adapter that training without (or with corrected) records would have "
        "produced, by the LLMEraser influence update theta + (H + lambda I)^-1 b, then verify it: a "
        "membership test compares the erased records under the new adapter with the held-out split of "
        "--data (records the adapter never trained on; `eraser train` sets them aside, --heldout-fraction). "
        "If the update alone does not pass, a bounded remediation fine-tune runs, then an exact retrain. "
        "The summary and eraser.json say which path produced the adapter and with what evidence. "
        "Nothing is written when the request is invalid or no adapter passes.",
    )
    erase.add_argument("--base", required=True, type=Path, help="base model directory (HF format)")
    erase.add_argument("--adapter", required=True, type=Path, help="the adapter to update (PEFT directory)")
    erase.add_argument("--data", required=True, type=Path,
                       help="the tenant's records (.jsonl): the adapter's training split plus its held-out split")
    erase.add_argument("--request", required=True, type=Path,
                       help="erasure request JSON (one object, or a list of them applied together)")
    erase.add_argument("--out", required=True, type=Path, help="new adapter directory (must not exist)")
    erase.add_argument("--heldout-fraction", type=float, default=None,
                       help="held-out fraction of --data the adapter was trained without (default: the value "
                       "`eraser train` recorded in the adapter's eraser.json; none recorded means 0)")
    erase.add_argument("--heldout-seed", type=int, default=None,
                       help="seed of the held-out split (default: recorded in eraser.json, else 0)")
    erase.add_argument("--reference", type=Path, default=None,
                       help="records of the same kind the adapter never trained on (.jsonl): the membership "
                       "test's reference, for an adapter trained elsewhere; then all of --data is training data "
                       "and no held-out split is taken from it")
    erase.add_argument("--heldout-unit", choices=("mixed", "record"), default=None,
                       help="unit of the held-out split (default: recorded in eraser.json; an eraser.json "
                       "without one predates whole-subject hold-out: record)")
    add_format_arguments(erase, recorded=True)
    add_precision_arguments(erase)
    erase.add_argument("--verify-original", action="store_true",
                       help="also run the membership test on the original adapter (evidence for the record: "
                       "it should fail where the adapter memorised the records; costs one more test)")
    erase.add_argument("--no-remediation", action="store_true", help="skip the remediation fine-tune")
    erase.add_argument("--no-retrain", action="store_true", help="never fall back to an exact retrain")
    erase.add_argument("--allow-unverified", action="store_true",
                       help="without a held-out reference, write the influence update marked unverified "
                       "(default: refuse)")
    erase.add_argument("--no-verify", action="store_true",
                       help="influence update only, no membership test (expert use; eraser.json says so)")
    add_solver_arguments(erase)
    erase.set_defaults(handler=run_erase)


def read_requests(path: Path):
    from eraser.requests import EditRequest

    if not path.is_file():
        raise FileNotFoundError(f"request file not found: {path}")
    body = json.loads(path.read_text(encoding="utf-8"))
    return [EditRequest.from_json(obj) for obj in (body if isinstance(body, list) else [body])]


def heldout_split(args: argparse.Namespace, records, parent: dict):
    """``(train, heldout, info)``: the split the adapter was trained with (eraser.json or the flags), or
    all of --data against the --reference records."""
    from eraser.records import load_records
    from eraser.reference import check_disjoint, split_heldout

    if args.reference is not None:
        reference = load_records(args.reference)
        check_disjoint(records, reference)
        return records, reference, {"reference": str(args.reference), "count": len(reference)}
    recorded = parent.get("heldout") or {}
    fraction = args.heldout_fraction if args.heldout_fraction is not None else recorded.get("fraction", 0.0)
    seed = args.heldout_seed if args.heldout_seed is not None else recorded.get("seed", 0)
    unit = args.heldout_unit or recorded.get("unit") or ("record" if recorded else "mixed")
    train, heldout = split_heldout(records, fraction, seed, unit)
    return train, heldout, {"fraction": fraction, "seed": seed, "unit": unit, "count": len(heldout)}


def recipe_from_manifest(parent: dict):
    """The adapter's training recipe from its eraser.json (the retrain fallback's), or None."""
    from dataclasses import fields

    from eraser.training import TrainConfig

    recipe = parent.get("recipe")
    if not recipe:
        return None
    known = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in recipe.items() if k in known}
    if "target_modules" in values:
        values["target_modules"] = tuple(values["target_modules"])
    return TrainConfig(**values)


def run_erase(args: argparse.Namespace) -> int:
    from cli.main import CommandError
    from cli.progress import residual_bar
    from eraser.model import load_adapter, load_base, load_tokenizer
    from eraser.pipeline import PipelineConfig, verified_erase
    from eraser.records import load_records
    from eraser.update import read_manifest

    if args.out.exists() and any(args.out.iterdir()):
        raise CommandError(f"--out {args.out} exists and is not empty; adapter versions are immutable")
    config = solve_config_from_args(args)
    device, dtype = precision_from_args(args)
    requests = read_requests(args.request)
    parent = read_manifest(args.adapter)
    train, heldout, heldout_info = heldout_split(args, load_records(args.data), parent)
    tokenizer = load_tokenizer(args.base, format_from_args(args, parent.get("format")))
    model = load_adapter(load_base(args.base, dtype, device), args.adapter)
    if args.no_verify:
        return run_influence_only(args, model, tokenizer, train, heldout, requests, config, parent, heldout_info)
    pipeline = PipelineConfig(solve=config, remediate=not args.no_remediation, retrain=not args.no_retrain,
                              require_verification=not args.allow_unverified, verify_original=args.verify_original,
                              **({"search": None} if args.no_damping_search else {}))
    with residual_bar(f"{config.solver} solve", total=config.max_iters) as bar:
        outcome = verified_erase(model, tokenizer, train, requests, heldout, recipe=recipe_from_manifest(parent),
                                 config=pipeline, base_factory=lambda: load_base(args.base, dtype, device),
                                 progress=bar)
    summary = outcome.summary()
    write_erased_adapter(args, model, tokenizer, parent, requests, {
        "records_affected": outcome.records_affected,
        "path": outcome.path,
        "verified": outcome.verified,
        "solver": ({**outcome.solver.to_dict(), "config": config.to_dict()} if outcome.solver
                   else {"converged": False, "skipped": "no influence update applied", "attempts": outcome.attempts}),
        "checks": outcome.checks,
        "verification": summary["verification"],
        "retained": summary["retained"],
        "remediation": summary["remediation"],
        "retrain": summary["retrain"],
        "guard": outcome.guard,
        "heldout": {**heldout_info, "affected": outcome.heldout_affected},
        "reference": summary["reference"],
        "damping_search": summary["damping_search"],
        "stages": outcome.stages,
        "pipeline": pipeline.to_dict(),
    })
    print_outcome(outcome, args.out)
    return 0


def run_influence_only(args, model, tokenizer, train, heldout, requests, config, parent, heldout_info) -> int:
    """``--no-verify``: the bare influence update (no membership test), marked unverified."""
    from cli.progress import residual_bar
    from eraser.erase import erase
    from eraser.pipeline import restrict_requests

    requests_train, touched = restrict_requests(requests, train, heldout)
    with residual_bar(f"{config.solver} solve", total=config.max_iters) as bar:
        result = erase(model, tokenizer, train, requests_train, config, progress=bar)
    write_erased_adapter(args, model, tokenizer, parent, requests, {
        "records_affected": [edit.old.id for edit in result.edits],
        "solver": {**result.report.to_dict(), "config": config.to_dict()},
        "checks": result.checks,
        "stages": result.stages,
        "path": "influence",
        "verified": False,
        "verification": "skipped (--no-verify)",
        "heldout": {**heldout_info, "affected": touched},
    })
    print_summary(result, args.out)
    print("verified    NO (--no-verify): no membership test was run")
    return 0


def write_erased_adapter(args: argparse.Namespace, model, tokenizer, parent: dict, requests, fields: dict) -> None:
    """Write ``--out`` with its eraser.json: the lineage (the parent version, the requests), ``fields`` (what
    this erasure did and how it was checked), the rendering and precision, and the parent's training recipe
    (what a later retrain fallback needs)."""
    manifest = {"version": None, "parent_version": parent.get("version"),
                "request_ids": [r.request_id for r in requests], **fields,
                "format": format_manifest(tokenizer), "precision": precision_manifest(args)}
    if parent.get("recipe"):
        manifest["recipe"] = parent["recipe"]
    write_adapter(model, args.out, manifest)


def write_adapter(model, out: Path, manifest: dict) -> None:
    """Stage the adapter next to ``out`` and move it into place only when complete."""
    from eraser.update import save_adapter

    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as staging:
        save_adapter(model, Path(staging) / "adapter", manifest)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()
        shutil.move(str(Path(staging) / "adapter"), str(out))


def _test_line(result) -> str:
    if result is None:
        return "-"
    if not result.verifiable:
        return f"NOT VERIFIABLE: {result.reason}"
    return ("passed" if result.passed else "FAILED") + f": {result.reason}"


def print_outcome(outcome, out: Path) -> None:
    """The receipt's summary: path, test statistics before/after, retained before/after, time per stage."""
    verified = "verified" if outcome.verified else "UNVERIFIED: no held-out reference"
    print(f"path        {outcome.path} ({verified})")
    extra = f", {len(outcome.heldout_affected)} held-out record(s) named (never trained on)" if outcome.heldout_affected else ""
    print(f"records     {len(outcome.edits)} affected{extra}")
    print(f"test before {_test_line(outcome.verification_before)}")
    if outcome.path != "influence":
        print(f"test infl.  {_test_line(outcome.verification_influence)}")
    print(f"test after  {_test_line(outcome.verification)}")
    if outcome.retained_after is not None:
        print(f"retained    NLL {outcome.retained_before:.4f} -> {outcome.retained_after:.4f} "
              f"(bound {outcome.retained_bound:.4f})")
    checks = outcome.checks
    if "affected_loss_before" in checks:
        print(f"affected    loss {checks['affected_loss_before']:.4f} -> {checks['affected_loss_after']:.4f}")
    if "replacement_loss_before" in checks:
        print(f"replacement loss {checks['replacement_loss_before']:.4f} -> {checks['replacement_loss_after']:.4f}")
    report = outcome.solver
    if report is not None:
        relative = f" ({outcome.damping:g} x top eigenvalue)" if outcome.damping is not None else ""
        print(f"solver      {report.solver} ({report.extra.get('curvature')}), {report.iterations} iterations, "
              f"residual {report.relative_residual:.2e} (tol {report.tol:g}), damping {report.damping:.3g}{relative}")
    if outcome.search is not None:
        print(f"damping     searched on {outcome.reference.get('steering_records')} steering record(s): "
              f"{outcome.search.damping:.3g} x top eigenvalue in {len(outcome.search.evaluations)} evaluations")
    if outcome.reference:
        ref = outcome.reference
        print(f"reference   {ref['deciding_records']} deciding record(s) ({ref['deciding_subjects']} subjects), "
              f"alpha {ref['decision_alpha']:g} per look" + (" (too few to split: steering = deciding)"
                                                             if ref["shared"] else ""))
    for attempt in outcome.attempts:
        if attempt["outcome"] != "ok":
            print(f"            damping {attempt['damping']:g}: {attempt['outcome']}")
    if outcome.remediation is not None:
        r = outcome.remediation
        print(f"remediation {r.steps} steps, {r.wall_time_s:.1f}s, {'passed' if r.passed else 'failed'} ({r.stopped_by})")
    if outcome.retrain is not None:
        print(f"retrain     {outcome.retrain.steps} steps, final loss {outcome.retrain.final_loss:.4f}, "
              f"{outcome.retrain.wall_time_s:.1f}s")
    stages = ", ".join(f"{name[:-2]} {seconds:.1f}s" for name, seconds in outcome.stages.items())
    print(f"stages      {stages}")
    print(f"written     {out}")


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
