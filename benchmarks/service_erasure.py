"""What one erasure job costs in the service, and what warming the adapter's curvature saves.

The service's own path, not the method in isolation: a synthetic tenant in a real store (embedded
SeaweedFS), onboarded in-process, then the product's jobs through the product's runners on a local
Ray: the curvature job a coordinator runs when idle (``CurvatureJob``), and the same erasure job
(remove one customer, the default verified pipeline: solver ``eigen``, membership test, guard) once
cold (the job builds the curvature) and once warm (the job receives the warmed one). Per tenant size
and runner (Ray Train with N workers, a pooled Ray task, in-process): wall seconds of each job, the
job's own stages, and whether the warm and cold updates are the same bits. Against that, once per
size: the exact retrain the erasure replaces (the tenant's recipe on the records without the customer,
the product's training job, in-process), and the speed-up of the warm erasure over it.

    .venv/bin/python -m benchmarks.service_erasure                          # 200 and 600 records
    .venv/bin/python -m benchmarks.service_erasure --customers 40 --runners ray-train:1 ray-train:2 ray-task

Writes ``benchmarks/results/service_erasure.json`` (or ``--out``) and prints a Markdown table.
Timings are measurements of this machine, never test assertions.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
TENANT = "bench"


def build_tenant(store, root: Path, customers: int, per_customer: int, epochs: int, seed: int) -> list:
    """A base model like the demo's (random weights: timing does not depend on them), a tenant, its
    records, and its first adapter (trained in-process). Returns the records."""
    from cli.synthetic import customer_records
    from cluster import LocalErasureService
    from eraser.model import BaseModelConfig, build_base_model, save_base_model, train_tokenizer
    from eraser.records import corpus_text
    from tenants.models import LoraRecipe, Record, TenantConfig, TrainingRecipe

    raw = customer_records(customers, per_customer, seed=seed, id_prefix="b")
    tokenizer = train_tokenizer([corpus_text(r) for r in raw], vocab_size=1024)
    model = build_base_model(BaseModelConfig(vocab_size=1024), tokenizer, seed=seed)
    base = f"base-{customers}"
    save_base_model(model, tokenizer, root / base)
    store.put_model(base, root / base)
    store.create_tenant(TenantConfig(name=TENANT, base_model=base, lora=LoraRecipe(rank=16, alpha=32),
                                     training=TrainingRecipe(epochs=epochs, lr=2e-3, batch_size=8, seed=seed,
                                                             heldout_fraction=0.1, max_length=96)))
    records = [Record(id=r.id, subject=r.subject, prompt=r.prompt, response=r.response) for r in raw]
    store.put_dataset(TENANT, records)
    LocalErasureService(store.settings).onboard(TENANT)
    return records


def timed(run, job):
    """(wall seconds, result body, LoRA tensors) of one job."""
    from safetensors.torch import load_file

    started = time.perf_counter()
    with run(job) as result:
        wall = time.perf_counter() - started
        if not result.ok:
            raise RuntimeError(f"{type(job).__name__} failed: {result.error}")
        tensors = load_file(result.adapter_dir / "adapter_model.safetensors") if result.adapter_dir else None
        curvature = result.load_curvature()
    return wall, result.body, tensors, curvature


def erased_customer(records: list) -> tuple[str, list]:
    """The customer every runner's request removes, and the records that stay."""
    subject = records[0].subject
    return subject, [r for r in records if r.subject != subject]


def time_retrain(store, records: list) -> float:
    """Wall seconds of the exact retrain without the erased customer: a data version of the kept records
    (HEAD does not move) and the product's training job on it, in-process (no Ray launch charged)."""
    from cluster import LocalJobRunner
    from cluster.jobs import TrainingJob

    _, kept = erased_customer(records)
    data_version = store.put_dataset(TENANT, kept)
    started = time.perf_counter()
    with LocalJobRunner().run_training_job(TrainingJob(TENANT, store.settings, data_version)) as result:
        wall = time.perf_counter() - started
        if not result.ok:
            raise RuntimeError(f"the retrain failed: {result.error}")
    return wall


def measure(store, records: list, runner, label: str, retrain_s: float) -> dict:
    """The curvature job, then the erasure job cold and warm, on ``runner``."""
    from dataclasses import replace

    from cluster.jobs import CurvatureJob, ErasureJob
    from eraser.pipeline import PipelineConfig

    head, _ = store.get_head(TENANT)
    pipeline = PipelineConfig()
    subject, _ = erased_customer(records)
    request = {"request_id": "bench-1", "tenant": TENANT, "kind": "remove", "subjects": [subject]}
    erasure = ErasureJob(TENANT, store.settings, head.adapter, head.data, (request,),
                         {"bench-1": tuple(r.id for r in records if r.subject == subject)}, pipeline=pipeline)
    curvature_s, curvature_body, _, warmed = timed(runner.run_curvature_job,
                                                   CurvatureJob(TENANT, store.settings, head.adapter, head.data,
                                                                pipeline.solve))
    cold_s, cold, cold_update, _ = timed(runner.run_erasure_job, erasure)
    warm_s, warm, warm_update, _ = timed(runner.run_erasure_job, replace(erasure, curvature=runner.share(warmed)))
    row = {
        "records": len(records), "train_records": cold["train_records"], "runner": label,
        "curvature_job_s": curvature_s, "curvature_build_s": curvature_body["info"]["wall_time_s"],
        "curvature_rank": curvature_body["rank"], "curvature_mib": warmed.vectors.numel() * warmed.vectors.element_size() / 2**20,
        "erasure_cold_s": cold_s, "erasure_warm_s": warm_s,
        "cold_stages": cold["stages"], "warm_stages": warm["stages"],
        "cold_path": cold["path"], "warm_path": warm["path"],
        "cold_source": cold["solver"].get("curvature_cache"), "warm_source": warm["solver"].get("curvature_cache"),
        "iterations": cold["solver"].get("iterations"),
        "same_update": all(torch.equal(warm_update[k], v) for k, v in cold_update.items()),
        "retrain_s": retrain_s, "speedup_warm": retrain_s / warm_s, "speedup_cold": retrain_s / cold_s,
    }
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                      if not k.endswith("_stages")}), flush=True)
    return row


def make(name: str):
    """(runner, label) for a ``--runners`` entry."""
    from cluster import LocalJobRunner, RayTaskJobRunner, RayTrainJobRunner, RunnerSpec

    if name == "in-process":
        return LocalJobRunner(), "in-process"
    if name == "ray-task":
        return RayTaskJobRunner(RunnerSpec(max_failures=0)), "Ray task (pooled worker)"
    if name.startswith("ray-train:"):
        workers = int(name.split(":", 1)[1])
        return RayTrainJobRunner(RunnerSpec(num_workers=workers, max_failures=0)), f"Ray Train, {workers} worker(s)"
    raise SystemExit(f"unknown runner {name!r}: use ray-train:N, ray-task or in-process")


def table(rows: list[dict]) -> str:
    lines = ["| records | runner | curvature job (build) s | erasure cold s | erasure warm s | saved | influence cold / warm s | path | same update | retrain s | speed-up warm (cold) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        saved = r["erasure_cold_s"] - r["erasure_warm_s"]
        lines.append(
            f"| {r['records']} | {r['runner']} | {r['curvature_job_s']:.1f} ({r['curvature_build_s']:.1f}) | "
            f"{r['erasure_cold_s']:.1f} | {r['erasure_warm_s']:.1f} | {saved:.1f} ({saved / r['erasure_cold_s']:.0%}) | "
            f"{r['cold_stages'].get('influence_s', 0):.1f} / {r['warm_stages'].get('influence_s', 0):.1f} | "
            f"{r['cold_path']} / {r['warm_path']} | {'yes' if r['same_update'] else 'no'} | "
            f"{r['retrain_s']:.1f} | {r['speedup_warm']:.1f}x ({r['speedup_cold']:.1f}x) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--customers", type=int, nargs="+", default=[40, 120],
                        help="tenant sizes, in customers (5 records each)")
    parser.add_argument("--runners", nargs="+", default=["ray-train:1", "ray-task", "in-process"],
                        help="ray-train:N (Ray Train, N workers), ray-task (one pooled Ray worker: the service's "
                             "default for one worker), in-process")
    parser.add_argument("--epochs", type=int, default=3, help="onboarding epochs (timing barely depends on it)")
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "service_erasure.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    import ray

    from tenants.embedded import EmbeddedS3
    from tenants.store import TenantStore

    started = time.perf_counter()
    rows: list[dict] = []
    root = Path(tempfile.mkdtemp(prefix="bench-service-"))
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    try:
        with EmbeddedS3(root / "s3") as server:
            for customers in args.customers:
                settings = server.settings(bucket="bench", prefix=f"c{customers}", cache_dir=root / f"cache-{customers}")
                store = TenantStore(settings)
                store.ensure_bucket()
                records = build_tenant(store, root, customers, 5, args.epochs, args.seed)
                retrain_s = time_retrain(store, records)
                for name in args.runners:
                    rows.append(measure(store, records, *make(name), retrain_s=retrain_s))
    finally:
        ray.shutdown()
    from benchmarks import provenance

    result = {"benchmark": "service_erasure", "argv": argv, "versions": provenance.versions(), "options": {k: str(v) for k, v in vars(args).items()},
              "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": 1,
                          "cpus": args.ray_cpus},
              "elapsed_s": time.perf_counter() - started, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(table(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
