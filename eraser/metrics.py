"""Fidelity of an erased adapter against the retrained gold (function space and parameter space)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from eraser.devices import model_device
from eraser.records import Record, batches, shifted_logits_and_labels, token_weights
from eraser.rendering import generation_prompt_ids, stop_token_ids
from eraser.update import relative_distance

__all__ = ["greedy_answers", "nll_progress", "output_kl", "questions", "relative_distance"]


def nll_progress(before: float, after: float, gold: float) -> float:
    """How far a loss moved from the original adapter's value toward the gold's: 0 = not at all, 1 = as far
    as retraining, > 1 = overshoot. NaN when the gold equals the original (nothing to move)."""
    gap = gold - before
    return (after - before) / gap if abs(gap) > 1e-12 else math.nan


@torch.no_grad()
def output_kl(model, reference, records: Sequence[Record], tokenizer, batch_size: int = 16) -> float:
    """Mean over records of the response-token-averaged KL(reference || model) of next-token distributions."""
    total, count = 0.0, 0
    for batch in batches(records, tokenizer, batch_size):
        logits, labels = shifted_logits_and_labels(model, batch)
        ref_logits, _ = shifted_logits_and_labels(reference, batch)
        kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1), log_target=True,
                      reduction="none").sum(-1)  # (B, T)
        total += float((kl * token_weights(labels).to(kl.dtype)).sum())
        count += len(batch)
    return total / max(count, 1)


@torch.no_grad()
def greedy_answers(model, tokenizer, conversations: Sequence[Sequence[dict]], max_new_tokens: int = 48,
                   batch_size: int = 16) -> list[str]:
    """Greedy next assistant turn after each conversation (OpenAI messages), rendered by the tokenizer's
    chat template as vLLM's chat completions render it (left-padded batches, stop at end of turn)."""
    answers: list[str] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer)
    for start in range(0, len(conversations), batch_size):
        encoded = [generation_prompt_ids(tokenizer, messages) for messages in conversations[start : start + batch_size]]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long, device="cpu")
        attention = torch.zeros((len(encoded), width), dtype=torch.long, device="cpu")
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids):] = torch.tensor(ids, device="cpu")
            attention[row, width - len(ids):] = 1
        device = model_device(model)
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                eos_token_id=stops)
        for row in range(len(encoded)):
            answers.append(tokenizer.decode(output[row, width:], skip_special_tokens=True).strip())
    return answers


def questions(prompts: Sequence[str]) -> list[list[dict]]:
    """One-turn conversations asking each prompt."""
    return [[{"role": "user", "content": prompt}] for prompt in prompts]
