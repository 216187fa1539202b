"""Time one erasure job with 1 and 2 Ray Train workers (a measurement script, not a test).

    .venv/bin/python -m tests.cluster.measure_workers [--hidden 128 --layers 2 --customers 24 --repeats 2]

Starts its own Ray head and SeaweedFS, onboards one synthetic tenant in-process, then runs the same
erasure job (remove one customer's records, CG on the Gauss-Newton system) through
``RayTrainJobRunner`` with 1 and 2 workers, and through the in-process runner. Prints per-stage
seconds and checks the updates agree.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--customers", type=int, default=24)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import ray

    from cli.synthetic import customer_records
    from cluster import CoordinatorOptions, LocalErasureService, LocalJobRunner, RayTrainJobRunner, RunnerSpec
    from cluster.jobs import ErasureJob
    from eraser.influence import SolveConfig
    from eraser.pipeline import PipelineConfig
    from eraser.model import BaseModelConfig, build_base_model, save_base_model, train_tokenizer
    from eraser.records import format_prompt, format_response
    from tenants.embedded import EmbeddedS3
    from tenants.models import LoraRecipe, Record, TenantConfig, TrainingRecipe
    from tenants.store import TenantStore
    from tests.cluster.ray_head import RayHead

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="measure-"))
    head = RayHead(num_cpus=2).start()
    try:
        ray.init(address=head.address, log_to_driver=False)
        with EmbeddedS3(root / "s3") as server:
            settings = server.settings(bucket="measure", cache_dir=root / "cache", purge_grace_seconds=0)
            store = TenantStore(settings)
            store.ensure_bucket()
            raw = customer_records(args.customers, 5, seed=0, id_prefix="m")
            texts = [format_prompt(r.prompt) + format_response(r.response) for r in raw]
            tokenizer = train_tokenizer(texts, vocab_size=512)
            config = BaseModelConfig(vocab_size=512, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                     num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
                                     num_key_value_heads=args.hidden // 32, max_position_embeddings=128)
            save_base_model(build_base_model(config, tokenizer), tokenizer, root / "base")
            store.put_model("base", root / "base")
            store.create_tenant(TenantConfig(name="acme", base_model="base", lora=LoraRecipe(rank=args.rank, alpha=2 * args.rank),
                                             training=TrainingRecipe(epochs=1, lr=3e-3, batch_size=8, heldout_fraction=0.2,
                                                                     max_length=96)))
            records = [Record(id=r.id, subject=r.subject, prompt=r.prompt, response=r.response) for r in raw]
            store.put_dataset("acme", records)
            LocalErasureService(settings).onboard("acme")
            head_version, _ = store.get_head("acme")
            subject = records[0].subject
            request = {"request_id": "m-1", "tenant": "acme", "kind": "remove", "subjects": [subject]}
            job = ErasureJob(tenant="acme", store_settings=settings, adapter_version=head_version.adapter,
                             data_version=head_version.data, requests=(request,),
                             selections={"m-1": tuple(r.id for r in records if r.subject == subject)},
                             pipeline=PipelineConfig(solve=SolveConfig(damping=0.1, tol=1e-3, max_iters=100, power_iters=10)),
                             job_id=uuid.uuid4().hex[:6])
            runs = []
            for repeat in range(args.repeats):
                for workers in (1, 2):
                    started = time.perf_counter()
                    with RayTrainJobRunner(RunnerSpec(num_workers=workers, max_failures=0)).run_erasure_job(job) as result:
                        wall = time.perf_counter() - started
                        assert result.ok, result.error
                        runs.append({"workers": workers, "repeat": repeat, "wall_s": round(wall, 2),
                                     **{k: round(v, 2) for k, v in result.body["stages"].items()},
                                     "iterations": result.body["solver"].get("iterations")})
                        print(json.dumps(runs[-1]), flush=True)
            started = time.perf_counter()
            with LocalJobRunner().run_erasure_job(job) as result:
                runs.append({"workers": "in-process", "wall_s": round(time.perf_counter() - started, 2),
                             **{k: round(v, 2) for k, v in result.body["stages"].items()}})
                print(json.dumps(runs[-1]), flush=True)
                from safetensors.torch import load_file

                p = sum(t.numel() for t in load_file(str(result.adapter_dir / "adapter_model.safetensors")).values())
                print(json.dumps({"lora_parameters": p, "train_records": result.body["train_records"]}))
    finally:
        ray.shutdown()
        head.stop()


if __name__ == "__main__":
    main()
