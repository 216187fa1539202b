"""Step 1, the world the demo builds: the base model, three tenants and their customer records.

The base is a ChatML tokenizer + Llama pretrained on *other* customers' conversations; each tenant gets
synthetic customer-support records (OpenAI chat form) holding personal data and an API key. The step is
checked on the store: the base model is there, and each tenant exists with the expected number of
records in its data version and a key that verifies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cli.demo.config import BASE_MODEL_NAME, DemoConfig
from cli.demo.report import DemoReport, say, stage


@dataclass
class World:
    """What step 1 made: the local base model directory, each tenant's API key and records."""

    base_dir: Path
    keys: dict[str, str]
    records: dict[str, list]


def tenant_records(config: DemoConfig) -> dict[str, list]:
    from cli.synthetic import customer_records

    domains = {name: f"{name}.example" for name in config.tenants}
    return {name: customer_records(config.customers_per_tenant, seed=config.seed + 11 * i, domain=domains[name],
                                   id_prefix=name, chat=True)
            for i, name in enumerate(config.tenants)}


def build_base(config: DemoConfig, records: dict[str, list], out: Path) -> dict:
    """A ChatML tokenizer + Llama base pretrained on *other* customers' conversations, rendered with its own
    chat template (never the tenants' records): an instruct base with a chat template, as platforms have."""
    from cli.progress import loss_bar
    from cli.synthetic import generic_records
    from eraser.bases import chatml_tokenizer
    from eraser.model import BaseModelConfig, build_base_model, save_base_model
    from eraser.records import corpus_text
    from eraser.training import pretrain_base

    everyone = [r for rows in records.values() for r in rows]
    others = generic_records(everyone, documents=config.pretrain_documents, seed=config.seed + 1, chat=True)
    tokenizer = chatml_tokenizer([corpus_text(r) for r in others], vocab_size=config.vocab_size)
    corpus = [tokenizer.apply_chat_template(r.messages(), tokenize=False) for r in others]
    model = build_base_model(BaseModelConfig(vocab_size=config.vocab_size), tokenizer, seed=config.seed)
    with loss_bar("pretraining the base model") as bar:
        report = pretrain_base(model, tokenizer, corpus, steps=config.pretrain_steps, seed=config.seed, progress=bar)
    save_base_model(model, tokenizer, out, {"pretrain_steps": config.pretrain_steps, "documents": len(corpus),
                                            "final_loss": report.final_loss})
    return {"parameters": sum(p.numel() for p in model.parameters()), "pretrain_loss": report.final_loss}


def create_world(config: DemoConfig, store, report: DemoReport) -> World:
    """Step 1: build the base, create the tenants in ``store``, and check them there."""
    from tenants.models import LoraRecipe, TenantConfig, TrainingRecipe

    store.ensure_bucket()
    records = tenant_records(config)
    with stage("1. base model and three tenants with customer records"):
        base_dir = config.workdir / "base"
        base_info = build_base(config, records, base_dir)
        store.put_model(BASE_MODEL_NAME, base_dir)
        keys = {}
        for tenant, rows in records.items():
            store.create_tenant(TenantConfig(
                name=tenant, base_model=BASE_MODEL_NAME,
                lora=LoraRecipe(rank=config.rank, alpha=2 * config.rank),
                training=TrainingRecipe(epochs=config.epochs, lr=config.lr, batch_size=config.batch_size,
                                        seed=config.seed, heldout_fraction=config.heldout_fraction, max_length=128)))
            keys[tenant] = store.issue_key(tenant)
            store.put_dataset(tenant, [r.to_json() for r in rows])
            say(f"   tenant {tenant}: {len(rows)} records about {config.customers_per_tenant} customers")
        world = World(base_dir, keys, records)
        stored, problems = check_world(config, store, world)
        report.add("base model and tenants created", not problems, base=base_info, tenants=list(records),
                   records=stored, problems=problems)
    return world


def check_world(config: DemoConfig, store, world: World) -> tuple[dict[str, int], list[str]]:
    """``(records stored per tenant, problems)``: what the store holds against what step 1 meant to write."""
    from cli.synthetic import TEMPLATES

    expected = config.customers_per_tenant * len(TEMPLATES)  # customer_records' default: every fact
    problems = [] if BASE_MODEL_NAME in store.list_models() else [f"no base model {BASE_MODEL_NAME!r} in the store"]
    stored: dict[str, int] = {}
    for tenant in config.tenants:
        if not store.tenant_exists(tenant):
            problems.append(f"tenant {tenant}: not in the store")
            continue
        versions = store.list_data_versions(tenant)
        stored[tenant] = store.get_data_manifest(tenant, versions[-1]).records if versions else 0
        if stored[tenant] != expected or len(world.records[tenant]) != expected:
            problems.append(f"tenant {tenant}: {stored[tenant]} records stored, {len(world.records[tenant])} "
                            f"generated, {expected} expected")
        if not store.verify_key(tenant, world.keys[tenant]):
            problems.append(f"tenant {tenant}: its API key does not verify")
    return stored, problems
