"""TOFU's metrics on an adapter, against the retrained gold: forget quality (truth ratios + KS test),
NLL, ROUGE-L of greedy answers, output KL, parameter distance; and a per-method peak-memory probe."""

from __future__ import annotations

import math
import os
import resource
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch

from eraser.metrics import greedy_answers, output_kl, questions, relative_distance
from eraser.records import Record, per_record_losses

from benchmarks.tofu_data import TofuRow

__all__ = ["forget_quality", "greedy_answers", "ks_pvalue", "output_kl", "peak_memory", "questions",
           "relative_distance", "rouge_l", "truth_ratios"]


def has_truth_fields(row: TofuRow) -> bool:
    return bool(row.paraphrased_answer and row.perturbed_answers)


@torch.no_grad()
def truth_ratios(model, tokenizer, rows: Sequence[TofuRow], batch_size: int = 32) -> np.ndarray:
    """TOFU's truth ratio per row: ``mean_j P(perturbed_j | q)^(1/|a_j|) / P(paraphrased | q)^(1/|a|)``,
    each probability normalised per token, i.e. ``mean_j exp(-nll_j) / exp(-nll_paraphrased)`` with the
    eraser's loss (mean NLL of the answer tokens). Rows without TOFU's extra fields are skipped."""
    rows = [row for row in rows if has_truth_fields(row)]
    if not rows:
        return np.zeros(0)
    probes: list[Record] = []
    for row in rows:
        probes.append(Record(id=f"{row.id}/para", prompt=row.question, response=row.paraphrased_answer))
        probes.extend(Record(id=f"{row.id}/pert{j}", prompt=row.question, response=answer)
                      for j, answer in enumerate(row.perturbed_answers))
    losses = per_record_losses(model, probes, tokenizer, batch_size).double().numpy()
    ratios, offset = [], 0
    for row in rows:
        paraphrased = losses[offset]
        perturbed = losses[offset + 1 : offset + 1 + len(row.perturbed_answers)]
        offset += 1 + len(row.perturbed_answers)
        ratios.append(float(np.mean(np.exp(-perturbed)) / np.exp(-paraphrased)))
    return np.asarray(ratios)


def ks_pvalue(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov p-value (1.0 for identical samples)."""
    from scipy.stats import ks_2samp

    if len(a) == 0 or len(b) == 0:
        return math.nan
    return float(ks_2samp(a, b).pvalue)


def forget_quality(model_ratios: np.ndarray, gold_ratios: np.ndarray) -> float:
    """TOFU's forget quality: the KS-test p-value between the truth-ratio distributions of the model and
    of the retrained gold on the forgotten rows. High (>= 0.05) = indistinguishable from retraining."""
    return ks_pvalue(model_ratios, gold_ratios)


@torch.no_grad()
def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L recall of predictions against references (TOFU's model-utility convention)."""
    from rouge_score import rouge_scorer

    if not predictions:
        return math.nan
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(np.mean([scorer.score(ref, pred)["rougeL"].recall for pred, ref in zip(predictions, references)]))


def mean_nll(model, tokenizer, records: Sequence[Record], batch_size: int = 32) -> float:
    if not records:
        return math.nan
    return float(per_record_losses(model, records, tokenizer, batch_size).mean())


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@contextmanager
def peak_memory() -> Iterator[dict]:
    """Peak resident memory of the process while the block runs (Linux: VmHWM, reset on entry through
    /proc/self/clear_refs). Yields a dict filled on exit: ``peak_rss_mb`` and ``peak_extra_mb`` (the peak
    minus the resident size on entry). Where the peak cannot be reset, it is the process's lifetime
    peak (``ru_maxrss``) and ``reset`` is False. tracemalloc would not see torch's allocations."""
    result: dict = {}
    reset = False
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        reset = True
    except OSError:
        pass
    start = _status_kib("VmRSS")
    try:
        yield result
    finally:
        peak = _status_kib("VmHWM") if reset else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        result.update(peak_rss_mb=peak / 1024, peak_extra_mb=(peak - (start or peak)) / 1024, reset=reset,
                      pid=os.getpid())
