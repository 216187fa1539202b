"""Tiny models and records for the method's tests (float64 where an exact reference is needed)."""

from __future__ import annotations

import pytest
import torch

from eraser.model import BaseModelConfig, build_base_model, train_tokenizer
from eraser.records import Record
from eraser.training import TrainConfig, add_lora

NAMES = ["Ada Park", "Ben Ortiz", "Cleo Nash", "Dev Rao", "Eli Stone", "Fay Lund", "Gus Hale", "Hana Ito"]


def customer_records(n_customers: int = 8, per_customer: int = 3) -> list[Record]:
    records = []
    for c, name in enumerate(NAMES[:n_customers]):
        facts = [
            (f"What is the email of {name}?", f"The email of {name} is {name.split()[0].lower()}{c}@mail.test."),
            (f"Which city does {name} live in?", f"{name} lives in city number {100 + 7 * c}."),
            (f"What is the account of {name}?", f"Account {4000 + 13 * c} belongs to {name}."),
        ]
        for k, (prompt, response) in enumerate(facts[:per_customer]):
            records.append(Record(id=f"c{c}-{k}", subject=name, prompt=prompt, response=response))
    return records


@pytest.fixture(scope="session", autouse=True)
def rmsnorm_in_input_dtype():
    """transformers' LlamaRMSNorm computes in float32 whatever the input; for float64 reference
    checks (finite differences at 1e-6) it must keep float64. Same formula, input dtype."""
    from transformers.models.llama import modeling_llama

    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)
        yield


@pytest.fixture(scope="session")
def records() -> list[Record]:
    return customer_records()


@pytest.fixture(scope="session")
def tokenizer(records):
    texts = [r.prompt + " " + r.response for r in records]
    return train_tokenizer(texts, vocab_size=300)


def tiny_lora_model(tokenizer, dtype=torch.float64, rank: int = 2, seed: int = 0, hidden: int = 16):
    config = BaseModelConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    base = build_base_model(config, tokenizer, seed=seed)
    base = base.to(dtype)
    model = add_lora(base, TrainConfig(rank=rank, target_modules=("q_proj", "v_proj"), seed=seed))
    model = model.to(dtype)
    # PEFT initialises B = 0, where the curvature is degenerate; move to a generic point.
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator, dtype=dtype))
    return model.eval()


@pytest.fixture()
def tiny_model(tokenizer):
    return tiny_lora_model(tokenizer)
