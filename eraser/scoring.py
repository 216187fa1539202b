"""Per-record statistics of one population under one adapter (:class:`RecordStats`): the membership
score ``log(NLL / base NLL)``, Min-K% and, where the response holds a secret-like span, its
base-calibrated exposure. The membership test (:mod:`eraser.verify`) and the damping search
(:mod:`eraser.damping`) both score records this way."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from eraser.model import adapter_disabled
from eraser.records import Record, token_nlls
from eraser.reference import subject_key
from eraser.secrets import DIGIT, constant_digits, secret_exposure, secret_slots
from eraser.verify_config import VerifyConfig

__all__ = ["RecordStats", "membership_scores", "min_k_nll", "record_statistics"]


@dataclass
class RecordStats:
    """Per-record statistics of one population under one adapter (lists aligned with ``ids``)."""

    ids: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)  # subject (or record) key: what records cluster by
    nll: list[float] = field(default_factory=list)
    base_nll: list[float] = field(default_factory=list)  # adapter disabled
    score: list[float] = field(default_factory=list)  # log(nll / base_nll) (calibrate) or log nll
    min_k: list[float] = field(default_factory=list)
    exposure: list[float | None] = field(default_factory=list)  # None: no secret-like span
    secret_rank: list[int | None] = field(default_factory=list)  # 1 = the true secret is the most likely

    def summary(self) -> dict:
        exposures = [e for e in self.exposure if e is not None]
        return {
            "count": len(self.ids),
            "subjects": len(set(self.groups)),
            "nll_mean": _mean(self.nll),
            "nll_median": float(np.median(self.nll)) if self.nll else None,
            "score_mean": _mean(self.score),
            "min_k_mean": _mean(self.min_k),
            "exposure_max": max(exposures) if exposures else None,
        }

    def select(self, ids: Iterable[str]) -> "RecordStats":
        """The statistics of ``ids``, in that order (lists left empty, such as ``base_nll`` without
        calibration, stay empty)."""
        where = {record_id: i for i, record_id in enumerate(self.ids)}
        keep = [where[record_id] for record_id in ids if record_id in where]
        return RecordStats(**{name: [values[i] for i in keep] if values else []
                              for name, values in asdict(self).items()})



def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def min_k_nll(tokens, fraction: float) -> float:
    """Mean NLL of the ``ceil(fraction * T)`` least likely tokens (Min-K%, as an NLL)."""
    count = max(1, math.ceil(fraction * tokens.numel()))
    return float(tokens.topk(count).values.mean())


def membership_scores(nll: Sequence[float], base_nll: Sequence[float] | None = None) -> list[float]:
    """``log(nll / base_nll)`` per record (``log nll`` without a base): low = taught by the adapter."""
    logs = np.log(np.maximum(np.asarray(nll, dtype=float), 1e-8))
    if base_nll is not None:
        logs = logs - np.log(np.maximum(np.asarray(base_nll, dtype=float), 1e-8))
    return [float(v) for v in logs]


def record_statistics(model, tokenizer, records: Sequence[Record], config: VerifyConfig,
                      secrets: bool = True, population: Sequence[Record] = (),
                      secret_ids: set[str] | None = None, kept: Mapping[str, set[int]] | None = None) -> RecordStats:
    """Score, NLL, Min-K% and (where the response holds a secret-like span) calibrated exposure and rank.

    ``population``: the tenant's records the format of digit runs is learned from (constant_digits);
    ``secret_ids``: the records whose exposure is computed (None: all); ``kept``: per record id, the
    response positions whose digits are not secret (a correction keeps them: ``kept_digits``).
    """
    stats = RecordStats(ids=[r.id for r in records], groups=[subject_key(r) for r in records])
    if not records:
        return stats
    model.eval()
    tokens, losses = token_nlls(model, records, tokenizer, config.batch_size)
    stats.nll = [float(v) for v in losses]
    if config.calibrate:
        with adapter_disabled(model):
            _, base = token_nlls(model, records, tokenizer, config.batch_size)
        stats.base_nll = [float(v) for v in base]
    stats.score = membership_scores(stats.nll, stats.base_nll if config.calibrate else None)
    stats.min_k = [min_k_nll(t, config.min_k) for t in tokens]
    for record in records:
        wanted = secrets and (secret_ids is None or record.id in secret_ids)
        exposure, rank = (_record_exposure(model, tokenizer, record, config, population, (kept or {}).get(record.id))
                          if wanted else (None, None))
        stats.exposure.append(exposure)
        stats.secret_rank.append(rank)
    return stats


def _record_exposure(model, tokenizer, record: Record, config: VerifyConfig,
                     population: Sequence[Record], kept: set[int] | None = None) -> tuple[float | None, int | None]:
    if len(DIGIT.findall(record.response)) - len(kept or ()) < config.min_secret_digits:
        return None, None
    slots = (secret_slots(model, tokenizer, record, config.format_probability) if config.calibrate_exposure
             else [i for i, ch in enumerate(record.response) if ch.isdigit()])
    fixed = constant_digits(record, population) | (kept or set())
    slots = [i for i in slots if i not in fixed]
    if len(slots) < config.min_secret_digits:
        return None, None
    args = (slots, config.secret_candidates, config.seed, config.batch_size)
    exposure, rank = secret_exposure(model, tokenizer, record, *args)
    if config.calibrate_exposure:
        with adapter_disabled(model):
            exposure -= secret_exposure(model, tokenizer, record, *args)[0]
    return exposure, rank
