"""Secret-like digit spans: which digits are a secret, and how exposed the adapter leaves them.

The exposure of Carlini et al. (2019, "The Secret Sharer", section 4.3, extrapolated by a
distribution fit): ``-log2 P(candidate log-likelihood >= the true one)`` over candidates that re-draw
the span's digits, with a normal fit to the candidates' summed NLL. The span is the digits the base
model (adapter disabled) cannot predict (:func:`secret_slots`) and that vary across the tenant's
same-shape digit runs (:func:`constant_digits`): a constant "555-" or the "20" of a year is format,
not a secret. :mod:`eraser.verify` subtracts the base model's exposure, so a model that never saw the
record scores about 0.
"""

from __future__ import annotations

import math
import random
import re
from typing import Sequence

import numpy as np
import torch

from eraser.model import adapter_disabled
from eraser import rendering
from eraser.records import Record, token_nlls
from eraser.reference import heldout_score

DIGIT = re.compile(r"\d")


def secret_slots(model, tokenizer, record: Record, format_probability: float) -> list[int]:
    """Positions (in ``record.response``) of the digits the *base* model (adapter disabled) cannot
    predict: a digit whose token it gives probability >= ``format_probability`` given the true prefix
    is format that every model of the family knows ("555-", "20" of a year), not a secret."""
    encoding = rendering.encode(tokenizer, record.messages())
    start = encoding.text.rfind(record.response)  # the final answer's place in the rendered text
    learned = [span for span, label in zip(encoding.offsets, encoding.labels) if label != rendering.IGNORE_INDEX]
    with adapter_disabled(model):
        tokens, _ = token_nlls(model, [record], tokenizer)
    probabilities = torch.exp(-tokens[0])  # (learned tokens,), in the order of ``learned``
    slots: list[int] = []
    for j, (lo, hi) in enumerate(learned[: len(probabilities)]):
        if float(probabilities[j]) < format_probability:
            slots += [c - start for c in range(max(lo, start), min(hi, start + len(record.response)))
                      if encoding.text[c].isdigit()]
    return sorted(set(slots))


DIGIT_RUN = re.compile(r"\d+(?:[-./]\d+)*")  # "555-452-2091", "37-5375-391", "2016"
MIN_FORMAT_SUPPORT = 3  # same-shape runs needed before a constant digit counts as format


def constant_digits(record: Record, population: Sequence[Record]) -> set[int]:
    """Positions (in ``record.response``) of digits that every same-shape digit run in ``population``
    shares (at least MIN_FORMAT_SUPPORT runs): the "555" of every phone number is the tenant's format
    whatever the base model knows (a randomly initialised base knows nothing)."""
    runs: dict[str, list[str]] = {}
    for other in population:
        for match in DIGIT_RUN.finditer(other.response):
            runs.setdefault(DIGIT.sub("d", match.group()), []).append(match.group())
    constant: set[int] = set()
    for match in DIGIT_RUN.finditer(record.response):
        same = runs.get(DIGIT.sub("d", match.group()), [])
        if len(same) < MIN_FORMAT_SUPPORT:
            continue
        for offset, ch in enumerate(match.group()):
            if ch.isdigit() and all(run[offset] == ch for run in same):
                constant.add(match.start() + offset)
    return constant


DIGITS = re.compile(r"\d+")


def kept_digits(old: str, new: str) -> set[int]:
    """Positions (in ``old``) of the digits a correction keeps: each maximal digit run of the old answer
    that the new answer also holds as a digit run ("05/25/1930" -> "May 25, 1930" keeps the 25 and the
    1930). A retrain on the new answer learns those digits, so they are no secret the correction
    removes, and exposure is measured only over the digits it changed."""
    carried = {match.group() for match in DIGITS.finditer(new)}
    return {i for match in DIGITS.finditer(old) if match.group() in carried for i in range(*match.span())}


def secret_candidates(record: Record, count: int, seed: int, slots: Sequence[int] | None = None) -> list[Record]:
    """``count`` copies of the record with the digits at ``slots`` (default: every digit) of the
    response re-drawn uniformly, seeded by the record id."""
    rng = random.Random(heldout_score(record.id, seed))
    positions = [i for i, ch in enumerate(record.response) if ch.isdigit()] if slots is None else list(slots)
    candidates, seen = [], {record.response}
    for _ in range(count * 4):
        chars = list(record.response)
        for i in positions:
            chars[i] = str(rng.randrange(10))
        response = "".join(chars)
        if response not in seen:
            seen.add(response)
            candidates.append(record.with_response(response))
        if len(candidates) == count:
            break
    return candidates


def _log2_normal_upper_exposure(true_total: float, candidate_totals: np.ndarray) -> float:
    """``-log2 P(X <= true)``, X ~ Normal fitted to candidates' summed NLL (low NLL = likely)."""
    mu, sigma = float(candidate_totals.mean()), float(candidate_totals.std(ddof=1)) + 1e-6
    z = (true_total - mu) / sigma
    tail = 0.5 * math.erfc(-z / math.sqrt(2))  # Phi(z)
    if tail > 1e-300:
        return -math.log2(tail)
    # Asymptotic Mills ratio for far tails: log Phi(z) ~ -z^2/2 - log(-z sqrt(2 pi)).
    return (z * z / 2 + math.log(-z * math.sqrt(2 * math.pi))) / math.log(2)


def secret_exposure(model, tokenizer, record: Record, slots: Sequence[int], candidates: int, seed: int,
                    batch_size: int = 16) -> tuple[float, int]:
    """``(exposure in bits, rank of the true span among the re-drawn ones)`` of the digits at ``slots``."""
    population = [record, *secret_candidates(record, candidates, seed, slots)]
    tokens, _ = token_nlls(model, population, tokenizer, batch_size)
    totals = np.array([float(t.sum()) for t in tokens])  # summed response NLL = -log p(response)
    rank = 1 + int((totals[1:] < totals[0]).sum())
    return _log2_normal_upper_exposure(totals[0], totals[1:]), rank
