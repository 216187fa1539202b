"""Small real models for the serving tests: a base Llama (head_dim 32, vLLM's CPU minimum), LoRA
adapters trained for a few steps on different synthetic records, and HF/PEFT greedy references."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch

from eraser.model import BaseModelConfig, build_base_model, load_adapter, load_base, load_tokenizer
from eraser.model import save_base_model, train_tokenizer
from eraser.records import Record, corpus_text
from eraser.training import TrainConfig, add_lora, train_lora
from eraser.update import save_adapter

# The recipe of every test adapter: rank 8 on all linear layers, enough steps to answer in kind.
RECIPE = TrainConfig(rank=8, alpha=16.0, epochs=12, lr=1e-2, batch_size=6, seed=1)
QUESTIONS = [f"What is the code of customer {i}?" for i in range(6)]


def tenant_records(tag: str) -> list[Record]:
    """Six records whose answers name ``tag``: adapters trained on different tags answer differently."""
    return [
        Record(id=f"{tag}-{i}", subject=f"customer {i}", prompt=q, response=f"{tag} code {17 * i + 3} for {tag}.")
        for i, q in enumerate(QUESTIONS)
    ]


def customer_records(tenant: str) -> list[Record]:
    """The cluster tests' synthetic customers (10 x 4 records): a tenant the erasure path can onboard and edit."""
    from cli.synthetic import customer_records as synthetic

    return synthetic(10, 4, seed=0, id_prefix=tenant)


def build_base(out_dir: Path, tags: Sequence[str]) -> Path:
    texts = [r.prompt + " " + r.response for tag in tags for r in tenant_records(tag)]
    texts += [corpus_text(r) for r in customer_records("x")]
    tokenizer = train_tokenizer(texts, vocab_size=512)
    model = build_base_model(BaseModelConfig(), tokenizer, seed=0)
    return save_base_model(model, tokenizer, out_dir)


def train_adapter(base_dir: Path, records: Sequence[Record], out_dir: Path, version: str = "v000001") -> Path:
    tokenizer = load_tokenizer(base_dir)
    model = add_lora(load_base(base_dir), RECIPE)
    train_lora(model, tokenizer, list(records), RECIPE)
    return save_adapter(model, out_dir, {"version": version})


@lru_cache(maxsize=None)
def _tokenizer(base_dir: str):
    return load_tokenizer(base_dir)


def completion_ids(base_dir: Path, prompt: str) -> list[int]:
    """Token ids of an OpenAI /v1/completions prompt (the text as-is, the tokenizer's special tokens)."""
    return _tokenizer(str(base_dir))(prompt)["input_ids"]


def chat_ids(base_dir: Path, question: str) -> list[int]:
    """Token ids of a one-message chat rendered by the base's chat template (the training format)."""
    tokenizer = _tokenizer(str(base_dir))
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@lru_cache(maxsize=8)
def _model(base_dir: str, adapter_dir: str | None):
    model = load_base(base_dir)
    return load_adapter(model, adapter_dir, trainable=False) if adapter_dir is not None else model


@torch.no_grad()
def hf_greedy(base_dir: Path, adapter_dir: Path | None, prompt_ids: list[int], max_tokens: int) -> str:
    """Greedy completion text by HF transformers + PEFT in float32 (the reference vLLM must equal)."""
    tokenizer = _tokenizer(str(base_dir))
    model = _model(str(base_dir), str(adapter_dir) if adapter_dir is not None else None)
    ids = torch.tensor([prompt_ids])  # (1, T)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                         do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def question_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"  # the built-in template's prompt, sent raw
