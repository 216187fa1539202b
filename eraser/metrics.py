"""Fidelity of an erased adapter against the retrained gold (function space and parameter space)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from eraser.records import Record, batches, shifted_logits_and_labels, token_weights
from eraser.update import relative_distance

__all__ = ["nll_progress", "output_kl", "relative_distance"]


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
