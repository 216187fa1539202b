"""The platform's own training code, as a platform with its own stack would run it: chat examples in the
OpenAI / TRL ``messages`` form, rendered with the ChatML template and its assistant-token mask, a LoRA
adapter trained with plain transformers + PEFT + AdamW, per-example losses. Nothing here calls the
eraser's method (only the template text comes from ``eraser.bases``): the TOFU chat benchmark erases
adapters trained by this code and compares against retrains by this code."""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Sequence

logger = logging.getLogger(__name__)


def chat_example(row) -> dict:
    """A TOFU row as a chat fine-tuning example (the OpenAI / TRL ``messages`` form)."""
    return {"messages": [{"role": "user", "content": row.question}, {"role": "assistant", "content": row.answer}]}


def render_example(tokenizer, example: dict) -> tuple[list[int], list[int]]:
    """Token ids and the assistant-token mask, as TRL's ``assistant_only_loss`` gets them."""
    from eraser.bases import CHATML_GENERATION_TEMPLATE  # the template text only

    out = tokenizer.apply_chat_template(example["messages"], tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True, chat_template=CHATML_GENERATION_TEMPLATE)
    return list(out["input_ids"]), list(out["assistant_masks"])


def collate_examples(tokenizer, examples: Sequence[dict]):
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 off the assistant tokens). (B, T) each."""
    import torch

    encoded = [render_example(tokenizer, example) for example in examples]
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for row, (ids, mask) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.tensor([t if m else -100 for t, m in zip(ids, mask)])
    return input_ids, attention_mask, labels


def per_example_loss(model, input_ids, attention_mask, labels):
    """Mean NLL over each example's assistant tokens. Shape (B,). (Not TRL's default, which averages over every
    assistant token of the batch: see benchmarks/tofu_chat.py's docstring.)"""
    import torch.nn.functional as F

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1, :]  # (B, T-1, V)
    targets = labels[:, 1:]  # (B, T-1)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                          reduction="none").view(targets.shape)
    mask = (targets != -100).to(nll.dtype)
    return (nll * mask).sum(dim=1) / mask.sum(dim=1)


def plain_peft_train(base_dir: Path, examples: Sequence[dict], options, seed: int | None = None):
    """Train a LoRA adapter on ``examples`` with plain transformers + PEFT + AdamW. ``options``: anything with
    the benchmark Options' seed, lora_r, lora_alpha, target_modules, lora_dropout, lr, epochs and batch_size.
    Returns (model in eval mode, tokenizer, report)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eraser.model import MODEL_CONSTRUCTION

    seed = options.seed if seed is None else seed
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    with MODEL_CONSTRUCTION:  # one model construction at a time in a process (eraser.model says why)
        base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha,
                                            target_modules=list(options.target_modules),
                                            lora_dropout=options.lora_dropout, task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=options.lr)
    rng = random.Random(seed)
    losses: list[float] = []
    started, cpu_started = time.perf_counter(), time.process_time()
    model.train()
    for epoch in range(options.epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order), options.batch_size):
            batch = collate_examples(tokenizer, [examples[i] for i in order[start: start + options.batch_size]])
            loss = per_example_loss(model, *batch).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        logger.info("  plain PEFT epoch %d/%d: mean batch loss %.4f (%.0fs)", epoch + 1, options.epochs,
                    sum(losses[-math.ceil(len(order) / options.batch_size):]) / math.ceil(len(order) / options.batch_size),
                    time.perf_counter() - started)
    model.eval()
    report = {"examples": len(examples), "steps": len(losses), "epochs": options.epochs, "seed": seed,
              "first_loss": losses[0], "final_loss": losses[-1],
              "wall_time_s": time.perf_counter() - started, "cpu_time_s": time.process_time() - cpu_started,
              "attn_implementation": getattr(base.config, "_attn_implementation", None),
              "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    return model, tokenizer, report


def plain_losses(model, tokenizer, examples: Sequence[dict], batch_size: int = 16) -> list[float]:
    import torch

    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            out += per_example_loss(model, *collate_examples(tokenizer, examples[start: start + batch_size])).tolist()
    return out


def chat_example_of(record) -> dict:
    """The platform's example of an eraser Record (the same conversation)."""
    return {"messages": record.messages()}
