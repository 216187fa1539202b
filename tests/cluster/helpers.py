"""A tiny tenant world for the cluster tests: a base model in the store, tenants with records."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from cli.synthetic import customer_records
from eraser.influence import SolveConfig
from eraser.pipeline import PipelineConfig
from tenants.models import LoraRecipe, Record, TenantConfig, TrainingRecipe

BASE_NAME = "tiny-llama"
# Small enough for a 2-core machine, head_dim 32 (vLLM's smallest), CG converges in ~20 iterations.
SOLVE = SolveConfig(solver="cg", curvature="ggn", damping=0.1, tol=1e-3, max_iters=100, power_iters=10)
PIPELINE = PipelineConfig(solve=SOLVE)
# The service's default solver (CG preconditioned by the cached low-rank curvature), sized for the tiny tenant.
EIGEN = replace(SOLVE, solver="eigen", tol=5e-2, max_iters=30, rank=48, cache_samples=32)


def tenant_records(tenant: str, customers: int = 10, per_customer: int = 4, seed: int = 0) -> list[Record]:
    return [Record(id=r.id, subject=r.subject, prompt=r.prompt, response=r.response)
            for r in customer_records(customers, per_customer, seed=seed, id_prefix=tenant)]


def build_base(out: Path) -> Path:
    """Tokenizer + 1-layer Llama (hidden 64, 2 heads of 32), randomly initialised: ~0.1 M parameters."""
    from eraser.model import BaseModelConfig, build_base_model, save_base_model, train_tokenizer
    from eraser.records import corpus_text

    texts = [corpus_text(r)
             for seed in range(3) for r in customer_records(20, 5, seed=seed)]
    tokenizer = train_tokenizer(texts, vocab_size=320)
    config = BaseModelConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    model = build_base_model(config, tokenizer, seed=0)
    return save_base_model(model, tokenizer, out, {"purpose": "cluster tests"})


def create_tenant(store, name: str, base_dir: Path, records: list[Record] | None = None) -> str:
    """Upload the base (once per store), create the tenant and its first data version; returns it."""
    if BASE_NAME not in store.list_models():
        store.put_model(BASE_NAME, base_dir)
    store.create_tenant(TenantConfig(
        name=name, base_model=BASE_NAME,
        lora=LoraRecipe(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]),
        training=TrainingRecipe(epochs=2, lr=1e-2, batch_size=8, seed=0, heldout_fraction=0.5, max_length=64),
    ))
    return store.put_dataset(name, records if records is not None else tenant_records(name))


def remove_subject(tenant: str, request_id: str, records: list[Record], index: int = 0) -> dict:
    subject = sorted({r.subject for r in records})[index]
    return {"request_id": request_id, "tenant": tenant, "kind": "remove", "subjects": [subject]}
