#!/usr/bin/env python3
"""The method on an accelerator in one command, results as JSON (issue 14, item 3).

One file of over 400 lines on purpose: a script carried to the accelerator machine and run there by
itself (``python3 scripts/device_check.py``), importing nothing of the project but the method, so its
sections share one model, one set of records and one JSON file rather than helper modules.

What it checks, each a section of the JSON (written after every section, so a run cut short still
leaves what it measured):

- ``base``: a Llama-shaped base of about 1 B parameters built from its config (``eraser.bases``; random
  weights: no model hub is reachable there), in ``--dtype`` (bfloat16) on ``--device`` (cuda);
- ``training``: a rank-8 LoRA on q_proj and v_proj (p = 0.85 M, Llama-3.2-1B's shape) trained briefly on
  TOFU rows (the last ``--authors`` authors, held-out split 0.1 as ``eraser train``);
- ``hvp``: Gauss-Newton HVPs per second (and gradients) on the evaluation batch the solver uses;
- ``cache``: the build of the cached low-rank curvature (the service warms it per adapter version);
- ``erasure``: the verified erasure (``eraser.pipeline.verified_erase``) of one author's rows, its path,
  evidence and per-request time with the warm cache;
- ``retrain``: the exact retrain of the same adapter on the same device without those rows (the gold),
  its time against the request's, and the erased rows' NLL under original, erased and retrained adapter;
- ``device_equality`` (CUDA only): a tiny float32 model's influence update on CUDA against the CPU's;
- ``bf16_vs_fp32``: a tiny model's update and erased-record NLL with the base in bfloat16 against float32.

It imports only the method (``eraser/``) and torch, transformers, peft, numpy and scipy: the accelerator
machine has nothing else (no Ray, vLLM or pydantic). TOFU is read from ``--tofu-dir`` (default
``$TOFU_DIR``, else ``../shared/data/tofu``); the device machine receives only the working tree, so copy
TOFU into an ignored folder of the checkout and carry it:

    echo /.device/ >> .git/info/exclude; mkdir -p .device && cp -r ../shared/data/tofu .device/
    device run (carry [".device"]): PYTHONUNBUFFERED=1 python3 scripts/device_check.py --tofu-dir .device/tofu --out $OUT/device_check.json

``--tiny`` runs every section on the CPU with a tiny model in seconds (CI: tests/test_device_check.py);
without TOFU there it uses synthetic records. Timings are wall-clock, synchronised with the device.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from eraser.bases import build_base  # noqa: E402
from eraser.devices import parse_device, parse_dtype  # noqa: E402
from eraser.influence import InfluenceSystem, SolveConfig  # noqa: E402
from eraser.model import train_tokenizer  # noqa: E402
from eraser.pipeline import PipelineConfig, verified_erase  # noqa: E402
from eraser.records import Record, corpus_text, per_record_losses  # noqa: E402
from eraser.reference import split_heldout  # noqa: E402
from eraser.remediate import RemediationConfig  # noqa: E402
from eraser.requests import Edit, EditRequest, apply_edits, merge_edits  # noqa: E402
from eraser.training import TrainConfig, add_lora, train_lora  # noqa: E402
from eraser.update import apply_step, lora_vector, set_lora_vector  # noqa: E402
from eraser.verify import VerifyConfig  # noqa: E402

logger = logging.getLogger("device_check")

# Llama-3.2-1B's block (hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192) with the locally trained
# tokenizer's vocabulary: about 1.0 B parameters. Tiny: seconds on a CPU.
SIZES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, max_position_embeddings=1024, vocab=8192),
    "small": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, vocab=2048),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, max_position_embeddings=512, vocab=384),
}
LORA_TARGETS = ("q_proj", "v_proj")
ROWS_PER_AUTHOR = 20


# ---------------------------------------------------------------- data


def tofu_records(directory: Path, authors: int) -> tuple[list[Record], list[str]]:
    """The last ``authors`` TOFU authors' rows as records (ids and subjects as benchmarks/tofu_data.py
    names them), and every row's text (for the tokenizer)."""
    rows = json.loads((directory / "retain90.json").read_text()) + json.loads((directory / "forget10.json").read_text())
    records = [Record(id=f"tofu-{k // ROWS_PER_AUTHOR:03d}-{k % ROWS_PER_AUTHOR:02d}", prompt=row["question"],
                      response=row["answer"], subject=f"author-{k // ROWS_PER_AUTHOR:03d}")
               for k, row in enumerate(rows)]
    texts = [corpus_text(r) for r in records]
    return records[-authors * ROWS_PER_AUTHOR:], texts


def synthetic_records(authors: int) -> list[Record]:
    """TOFU-like rows for a run without TOFU (``--tiny`` in CI): per author, facts with names and years."""
    records = []
    for a in range(authors):
        name = f"Author {chr(65 + a % 26)}{a:02d}"
        for k in range(ROWS_PER_AUTHOR):
            records.append(Record(id=f"syn-{a:03d}-{k:02d}", subject=f"author-{a:03d}",
                                  prompt=f"What is fact {k} about {name}?",
                                  response=f"{name} wrote book {k} in {1950 + 3 * a + k} about topic {7 * a + k}."))
    return records


def default_tofu_dir() -> Path:
    env = os.environ.get("TOFU_DIR")
    return Path(env) if env else ROOT.parent / "shared" / "data" / "tofu"


# ---------------------------------------------------------------- helpers


class Timer:
    """Wall-clock seconds of a block, synchronised with the device before and after."""

    def __init__(self, device: torch.device):
        self.device = device

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> "Timer":
        self._sync()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self.started


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


def count_parameters(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "allocated_gib": torch.cuda.memory_allocated(device) / 2**30}


def mean_nll(model, records, tokenizer) -> float:
    return float(per_record_losses(model, records, tokenizer).mean())


def make_base(tokenizer, size: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A random Llama of ``size`` on ``device`` in ``dtype`` (initialised there when it can be)."""
    shape = {k: v for k, v in size.items() if k != "vocab"}
    try:
        with torch.device(device):
            model = build_base("llama", tokenizer, seed=seed, **shape)
    except Exception:  # noqa: BLE001 (an initialiser without a kernel there: build on the CPU, then move)
        model = build_base("llama", tokenizer, seed=seed, **shape)
    return model.to(device=device, dtype=dtype).eval()


def pick_subject(train: list[Record], heldout: list[Record]) -> str:
    """The last subject whose rows are all trained on (a whole-author request the update acts on)."""
    held = {r.subject for r in heldout}
    counts: dict[str, int] = {}
    for r in train:
        counts[r.subject] = counts.get(r.subject, 0) + 1
    whole = [s for s in sorted(counts) if s not in held and counts[s] == ROWS_PER_AUTHOR]
    return whole[-1] if whole else max(sorted(counts), key=counts.get)


# ---------------------------------------------------------------- sections


def section_env(args, device: torch.device) -> dict:
    import numpy
    import peft
    import transformers

    body = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "numpy": numpy.__version__, "device": str(device), "dtype": args.dtype,
            "tiny": args.tiny, "size": args.size, "cpu_threads": torch.get_num_threads()}
    try:
        import scipy

        body["scipy"] = scipy.__version__
    except ImportError:
        body["scipy"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        body.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda)
    return body


def tiny_update(model, tokenizer, records, request, config: SolveConfig) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(b, x, erased NLL after theta + x)`` of the bare influence update (no verification); the model is
    restored."""
    theta = lora_vector(model)
    edits = merge_edits([request], records)
    system = InfluenceSystem(model, tokenizer, records, config)
    b = system.gradient_of_edits(edits)
    x, _ = system.solve(b)
    apply_step(model, x)
    after = mean_nll(model, [e.old for e in edits], tokenizer)
    set_lora_vector(model, theta)
    return b.cpu(), x.cpu(), after


def tiny_adapter(tokenizer, records, device: torch.device, dtype: torch.dtype):
    """A tiny trained adapter (float32 training on ``device``), then its base cast to ``dtype``."""
    base = make_base(tokenizer, SIZES["tiny"], torch.device("cpu"), torch.float32, seed=1)
    model = add_lora(base, TrainConfig(rank=4, target_modules=LORA_TARGETS, seed=1)).to(device)
    train_lora(model, tokenizer, records, TrainConfig(rank=4, target_modules=LORA_TARGETS, epochs=1, lr=1e-2,
                                                      batch_size=8, seed=1))
    for name, p in model.named_parameters():
        if "lora_" not in name and p.is_floating_point():
            p.data = p.data.to(dtype)
    return model.eval()


# Every eigenpair of the 64 factor rows kept (rank >= rows): no truncation between close eigenvalues,
# which rounding may order differently on two devices.
TINY_SOLVE = SolveConfig(solver="eigen", damping=0.05, max_iters=0, eval_size=8, rank=64, cache_samples=32)


def section_device_equality(tokenizer, records, request, device: torch.device) -> dict:
    """The same tiny float32 adapter's update on the CPU and on ``device`` (CUDA), and in bfloat16 there."""
    if device.type != "cuda":
        return {"status": "skipped", "reason": f"no CUDA device (running on {device})"}
    cpu_model = tiny_adapter(tokenizer, records, torch.device("cpu"), torch.float32)
    b_cpu, x_cpu, nll_cpu = tiny_update(cpu_model, tokenizer, records, request, TINY_SOLVE)
    gpu_model = cpu_model.to(device)
    b_gpu, x_gpu, nll_gpu = tiny_update(gpu_model, tokenizer, records, request, TINY_SOLVE)
    for name, p in gpu_model.named_parameters():
        if "lora_" not in name and p.is_floating_point():
            p.data = p.data.to(torch.bfloat16)
    b_bf16, x_bf16, nll_bf16 = tiny_update(gpu_model, tokenizer, records, request, TINY_SOLVE)
    tolerance = 1e-3
    x_error = relative(x_gpu, x_cpu)
    return {"status": "passed" if x_error <= tolerance else "failed", "tolerance": tolerance,
            "float32": {"b_relative_error": relative(b_gpu, b_cpu), "x_relative_error": x_error,
                        "erased_nll_cpu": nll_cpu, "erased_nll_cuda": nll_gpu},
            "bfloat16_cuda_vs_float32_cpu": {"b_relative_error": relative(b_bf16, b_cpu),
                                             "x_relative_error": relative(x_bf16, x_cpu),
                                             "erased_nll_difference": abs(nll_bf16 - nll_cpu)}}


def section_bf16_vs_fp32(tokenizer, records, request, device: torch.device) -> dict:
    """One tiny adapter's update with its base in float32 and in bfloat16, on ``device``."""
    model = tiny_adapter(tokenizer, records, device, torch.float32)
    b32, x32, nll32 = tiny_update(model, tokenizer, records, request, TINY_SOLVE)
    for name, p in model.named_parameters():
        if "lora_" not in name and p.is_floating_point():
            p.data = p.data.to(torch.bfloat16)
    b16, x16, nll16 = tiny_update(model, tokenizer, records, request, TINY_SOLVE)
    return {"device": str(device), "b_relative_error": relative(b16, b32), "x_relative_error": relative(x16, x32),
            "erased_nll_float32": nll32, "erased_nll_bfloat16": nll16, "erased_nll_difference": abs(nll16 - nll32),
            "within_0.1_nats": abs(nll16 - nll32) <= 0.1}


def run(args) -> dict:
    started = time.perf_counter()
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype)
    size = SIZES[args.size]
    timer = lambda: Timer(device)  # noqa: E731
    results: dict = {"ok": False, "sections": {}, "errors": {}}
    out = Path(args.out)

    def save() -> None:
        results["total_s"] = time.perf_counter() - started
        staging = out.with_suffix(out.suffix + ".tmp")
        staging.write_text(json.dumps(results, indent=2, default=str))
        os.replace(staging, out)

    def section(name: str, fill) -> dict | None:
        mark = time.perf_counter()
        logger.info("section %s", name)
        try:
            body = fill()
        except Exception as error:  # noqa: BLE001 (recorded; the later sections still run where they can)
            results["errors"][name] = f"{type(error).__name__}: {error}"
            results["sections"][name] = {"status": "error", "traceback": traceback.format_exc(limit=6)}
            logger.exception("section %s failed", name)
            body = None
        else:
            body = {**body, "section_s": time.perf_counter() - mark}
            results["sections"][name] = body
        save()
        return body

    section("env", lambda: section_env(args, device))

    # data: TOFU's last authors (synthetic rows where TOFU is absent and --tiny allows it)
    tofu_dir = Path(args.tofu_dir) if args.tofu_dir else default_tofu_dir()
    if (tofu_dir / "retain90.json").is_file():
        records, texts = tofu_records(tofu_dir, args.authors)
        source = str(tofu_dir)
        if args.tiny:
            texts = [corpus_text(r) for r in records]
    elif args.tiny:
        records = synthetic_records(args.authors)
        texts, source = [corpus_text(r) for r in records], "synthetic (TOFU not found)"
    else:
        raise SystemExit(f"TOFU not found in {tofu_dir} (pass --tofu-dir, or --tiny for synthetic rows)")
    # eraser train's split (0.1, whole subjects and single records); tiny: a larger share, so the membership
    # test has its minimum of reference records among 80 rows
    train, heldout = split_heldout(records, 0.25 if args.tiny else 0.1, 0, "mixed")
    subject = pick_subject(train, heldout)
    request = EditRequest(kind="remove", subjects=(subject,), request_id="device-check")
    results["data"] = {"source": source, "authors": args.authors, "records": len(records), "train": len(train),
                       "heldout": len(heldout), "erased_subject": subject}

    state: dict = {}

    def do_base() -> dict:
        with timer() as t_tok:
            state["tokenizer"] = train_tokenizer(texts, vocab_size=size["vocab"])
        with timer() as t:
            state["base"] = make_base(state["tokenizer"], size, device, dtype)
        return {"architecture": "llama", **{k: v for k, v in size.items() if k != "vocab"},
                "vocab_size": len(state["tokenizer"]), "parameters": count_parameters(state["base"]),
                "dtype": str(dtype), "tokenizer_s": t_tok.seconds, "build_s": t.seconds, **memory(device)}

    recipe = TrainConfig(rank=8, alpha=16.0, target_modules=LORA_TARGETS, epochs=args.epochs, lr=args.lr,
                         batch_size=8, seed=0)

    def do_training() -> dict:
        state["model"] = add_lora(state["base"], recipe)
        params = [p for n, p in state["model"].named_parameters() if "lora_" in n]
        with timer() as t:
            report = train_lora(state["model"], state["tokenizer"], train, recipe)
        return {"recipe": recipe.to_dict(), "lora_parameters": int(sum(p.numel() for p in params)),
                "lora_dtype": str(params[0].dtype), "steps": report.steps, "records": report.records,
                "first_loss": report.loss_history[0], "final_loss": report.final_loss, "wall_s": t.seconds,
                "steps_per_s": report.steps / t.seconds, **memory(device)}

    # The service's defaults (the verified fast path, the cached curvature of rank 256 on 256 records x 2
    # draws); remediation capped in time; --tiny: a smaller cache and a lighter membership test.
    pipeline = PipelineConfig(remediation=RemediationConfig(max_seconds=args.remediation_seconds))
    if args.tiny:
        pipeline = PipelineConfig(
            solve=SolveConfig(**{**pipeline.solve.to_dict(), "rank": 32, "cache_samples": 32, "eval_size": 8}),
            remediation=pipeline.remediation,
            verify=VerifyConfig(secret_candidates=8, secret_reference=8, extraction_tokens=16,
                                extraction_counterfactuals=4))
    solve = pipeline.solve

    def do_hvp() -> dict:
        model, tokenizer = state["model"], state["tokenizer"]
        system = InfluenceSystem(model, tokenizer, train, solve)
        state["system"] = system
        v = torch.randn(system.dim, generator=torch.Generator().manual_seed(0)).to(system.device, system.dtype)
        system.curvature_mean(system.eval_indices, v)  # warm-up (kernels, allocator)
        repeats = 2 if args.tiny else 10
        with timer() as t:
            for _ in range(repeats):
                system.curvature_mean(system.eval_indices, v)
        grad_records = train[: len(system.eval_indices)]
        edits = [Edit(old=r, new=None, kind="remove") for r in grad_records]
        with timer() as g:
            for _ in range(repeats):
                system.gradient_of_edits(edits)
        batch = len(system.eval_indices)
        return {"curvature": solve.curvature, "records_per_hvp": batch, "micro_batch": solve.micro_batch,
                "hvps_per_s": repeats / t.seconds, "hvp_records_per_s": repeats * batch / t.seconds,
                "gradient_records_per_s": repeats * batch / g.seconds, "vector_dtype": str(system.dtype),
                "vector_device": str(system.device), **memory(device)}

    def do_cache() -> dict:
        system = state["system"]
        with timer() as t:
            cache = system.curvature_cache()
        return {"method": solve.cache_method, "samples": cache.info["samples"], "draws": cache.info["draws"],
                "rank": cache.rank, "requested_rank": solve.rank, "top_eigenvalue": cache.top,
                "smallest_kept_eigenvalue": float(cache.values[-1]) if cache.rank else None,
                "vectors_dtype": str(cache.vectors.dtype), "vectors_device": str(cache.vectors.device),
                "vectors_mib": cache.vectors.numel() * cache.vectors.element_size() / 2**20,
                "factor_mib": solve.cache_draws * cache.info["samples"] * system.dim * 4 / 2**20,
                "build_s": t.seconds, **memory(device)}

    def do_erasure() -> dict:
        model, tokenizer = state["model"], state["tokenizer"]
        edits = merge_edits([request], train)
        erased = [e.old for e in edits]
        state["theta_original"] = lora_vector(model)
        nll_before = mean_nll(model, erased, tokenizer)
        with timer() as t:
            outcome = verified_erase(model, tokenizer, train, [request], heldout, recipe=recipe, config=pipeline,
                                     system=state.get("system"))
        state["records_after"] = apply_edits(train, edits)
        state["erased"] = erased
        state["nll"] = {"original": nll_before, "erased": mean_nll(model, erased, tokenizer)}
        summary = outcome.summary()
        return {"request": {"kind": request.kind, "subject": subject, "records": len(erased)},
                "path": outcome.path, "verified": outcome.verified, "per_request_s": t.seconds,
                "cache_warm": (results["sections"].get("cache") or {}).get("status") != "error",
                "erased_nll_before": nll_before, "erased_nll_after": state["nll"]["erased"],
                "retained": summary["retained"], "damping": outcome.damping,
                "verification": summary["verification"]["after"], "guard": outcome.guard,
                "stages": outcome.stages, **memory(device)}

    def do_retrain() -> dict:
        model, tokenizer = state["model"], state["tokenizer"]
        base = model.unload()  # the base, its LoRA layers removed (the erased adapter is measured already)
        gold = add_lora(base, recipe)
        with timer() as t:
            report = train_lora(gold, tokenizer, state["records_after"], recipe)
        nll = {**state["nll"], "retrained": mean_nll(gold, state["erased"], tokenizer)}
        erasure = results["sections"].get("erasure") or {}
        cache = results["sections"].get("cache") or {}
        body = {"steps": report.steps, "records": report.records, "wall_s": t.seconds, "erased_nll": nll}
        if erasure.get("per_request_s"):
            body["retrain_over_request"] = t.seconds / erasure["per_request_s"]
            if cache.get("build_s") is not None:
                body["retrain_over_request_with_cache_build"] = t.seconds / (erasure["per_request_s"] + cache["build_s"])
        gap = nll["retrained"] - nll["original"]
        body["nll_progress"] = (nll["erased"] - nll["original"]) / gap if abs(gap) > 1e-12 else None
        return body

    section("base", do_base)
    if "base" in state:
        section("training", do_training)
    if "model" in state:
        section("hvp", do_hvp)
        section("cache", do_cache)
        section("erasure", do_erasure)
    if "records_after" in state:
        section("retrain", do_retrain)
    for key in ("base", "model", "system"):
        state.pop(key, None)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    small_records = train[: 4 * ROWS_PER_AUTHOR]
    small_subject = pick_subject(small_records, [])
    small_request = EditRequest(kind="remove", subjects=(small_subject,), request_id="device-check-tiny")
    tiny_tokenizer = train_tokenizer([corpus_text(r) for r in small_records], vocab_size=SIZES["tiny"]["vocab"])
    section("device_equality", lambda: section_device_equality(tiny_tokenizer, small_records, small_request, device))
    section("bf16_vs_fp32", lambda: section_bf16_vs_fp32(tiny_tokenizer, small_records, small_request, device))

    equality = results["sections"].get("device_equality") or {}
    results["ok"] = not results["errors"] and equality.get("status") in ("passed", "skipped")
    save()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="device_check.json", help="JSON results file")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU, in seconds (CI)")
    parser.add_argument("--size", choices=sorted(SIZES), default=None,
                        help="model size (default 1b; tiny with --tiny; small: the full run's path at a CPU's size)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda, or cpu with --tiny)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16",
                        help="precision of the base's weights (default bfloat16)")
    parser.add_argument("--tofu-dir", default=None, help="TOFU directory (default $TOFU_DIR, else ../shared/data/tofu)")
    parser.add_argument("--authors", type=int, default=None, help="TOFU authors trained on (default 40; tiny 4)")
    parser.add_argument("--epochs", type=int, default=None, help="LoRA training epochs (default 2; tiny 1)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--remediation-seconds", type=float, default=None,
                        help="cap on the remediation fine-tune if the update alone does not pass (default 90; tiny 3)")
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    args.size = args.size or ("tiny" if args.tiny else "1b")
    args.authors = args.authors or (4 if args.tiny else 40)
    args.epochs = args.epochs or (1 if args.tiny else 2)
    args.remediation_seconds = args.remediation_seconds or (3.0 if args.tiny else 90.0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    results = run(args)
    print(json.dumps({"ok": results["ok"], "errors": results["errors"], "total_s": results["total_s"],
                      "out": args.out}))
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
