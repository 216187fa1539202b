"""The damping of one request, chosen from what production has: the steering half of the reference.

The influence step ``x(lambda) = (C + lambda I)^-1 b`` with the cached low-rank curvature costs one
Woodbury product per ``lambda`` (no HVP), so the step length can be chosen per request instead of by a
rule fitted on benchmark requests (issue 12: the fitted rule failed out of sample). What a retrain
does, and so what the search aims at:

- a **removed** record ends up scored like the reference records of its kind (records of subjects the
  adapter never saw, or held-out records of trained subjects: :mod:`eraser.reference`); the target
  is their mean score (``log(NLL / base NLL)``, :mod:`eraser.verify`) under the original adapter;
- a **new** pair (``correct_response``, ``modify_query``) ends up learned like any training record:
  the target is the retained sample's mean score.

The search minimises the count-weighted squared gap between each group's mean score under
``theta + x(lambda)`` and its target by golden-section search over ``log10(lambda)`` (relative to the
top curvature eigenvalue), evaluated on at most ``max_records`` records per group. It only ever sees
the *steering* reference: the deciding half judges the result afterwards (no multiple looks).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch

from eraser.errors import EraserError
from eraser.model import adapter_disabled
from eraser.records import Record, per_record_losses
from eraser.reference import evenly_spaced, member_pool, reference_pools
from eraser.requests import Edit
from eraser.update import lora_vector, set_lora_vector
from eraser.scoring import membership_scores

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DampingSearch:
    """Where and how finely to search the relative damping."""

    low: float = 1e-4  # relative damping range searched
    high: float = 1.0
    evaluations: int = 8  # golden-section evaluations after the two brackets
    max_records: int = 32  # records per group scored at each evaluation (evenly spaced)
    min_reference: int = 3  # fewer steering records of an erased record's kind: use the whole steering half

    def __post_init__(self) -> None:
        if not 0 < self.low < self.high:
            raise EraserError(f"damping search range must satisfy 0 < low < high, got {self.low!r}, {self.high!r}")
        if self.evaluations < 1 or self.max_records < 1 or self.min_reference < 1:
            raise EraserError("evaluations, max_records and min_reference must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DampingChoice:
    damping: float  # relative
    objective: float
    targets: dict = field(default_factory=dict)  # group -> target mean score
    evaluations: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Group:
    name: str
    records: list[Record]
    base: torch.Tensor | None  # NLL under the base model (adapter disabled), (n,); None: not calibrated
    target: float


def _scores(model, tokenizer, records: Sequence[Record]) -> tuple[torch.Tensor, torch.Tensor]:
    nll = per_record_losses(model, records, tokenizer).double()
    with adapter_disabled(model):
        base = per_record_losses(model, records, tokenizer).double()
    return nll, base


def _groups(model, tokenizer, edits: Sequence[Edit], steering: Sequence[Record], retained: Sequence[Record],
            trained_subjects: set[str], search: DampingSearch, calibrate: bool) -> list[_Group]:
    """The record groups whose mean score is steered, each with its target (under the original adapter)."""
    def mean_score(records: Sequence[Record]) -> float:
        nll, base = _scores(model, tokenizer, records)
        return float(np.mean(membership_scores(nll.tolist(), base.tolist() if calibrate else None)))

    groups: list[_Group] = []
    pools = reference_pools(steering, trained_subjects)
    removed = [e.old for e in edits if e.kind == "remove"]
    by_pool: dict[str, list[Record]] = {}
    for record in removed:
        by_pool.setdefault(member_pool(record, trained_subjects), []).append(record)
    for pool, records in sorted(by_pool.items()):
        reference = pools[pool] if len(pools[pool]) >= search.min_reference else list(steering)
        if not reference:
            continue
        groups.append(_Group(f"removed:{pool}", evenly_spaced(records, search.max_records), None,
                             mean_score(evenly_spaced(reference, 2 * search.max_records))))
    new = [e.new for e in edits if e.new is not None]
    if new and retained:
        groups.append(_Group("new", evenly_spaced(new, search.max_records), None,
                             mean_score(evenly_spaced(retained, search.max_records))))
    for group in groups:
        with adapter_disabled(model):
            group.base = per_record_losses(model, group.records, tokenizer).double() if calibrate else None
    return groups


def choose_damping(model, tokenizer, system, b: torch.Tensor, edits: Sequence[Edit], steering: Sequence[Record],
                   retained: Sequence[Record], trained_subjects: set[str], search: DampingSearch = DampingSearch(),
                   calibrate: bool = True) -> DampingChoice | None:
    """The relative damping whose low-rank step lands the edited records nearest their targets (see the
    module docstring); ``model`` is left holding its original adapter. None when nothing can steer it
    (no steering reference for removed records and no retained records for new pairs)."""
    started = time.perf_counter()
    theta0 = lora_vector(model)
    groups = _groups(model, tokenizer, edits, steering, retained, trained_subjects, search, calibrate)
    if not groups:
        return None
    cache = system.curvature_cache()
    top = max(system.top_eigenvalue(), 1e-12)
    weights = np.array([len(g.records) for g in groups], dtype=float)
    choice = DampingChoice(damping=float("nan"), objective=float("inf"), targets={g.name: g.target for g in groups})

    def objective(log_damping: float) -> float:
        damping = 10.0 ** log_damping
        set_lora_vector(model, theta0 + cache.inverse(b, damping * top))
        gaps = []
        for group in groups:
            nll = per_record_losses(model, group.records, tokenizer).double()
            score = membership_scores(nll.tolist(), group.base.tolist() if group.base is not None else None)
            gaps.append(float(np.mean(score)) - group.target)
        value = float((weights * np.square(gaps)).sum() / weights.sum())
        if not math.isfinite(value):
            value = float("inf")
        choice.evaluations.append({"damping": damping, "objective": value,
                                   "gaps": {g.name: gap for g, gap in zip(groups, gaps)}})
        return value

    try:
        best = _golden_section(objective, math.log10(search.low), math.log10(search.high), search.evaluations)
    finally:
        set_lora_vector(model, theta0)
    choice.damping = 10.0 ** best
    choice.objective = min(e["objective"] for e in choice.evaluations)
    choice.seconds = time.perf_counter() - started
    logger.info("damping search: relative damping %.3g (objective %.3g, %d evaluations, %.1fs); targets %s",
                choice.damping, choice.objective, len(choice.evaluations), choice.seconds,
                {k: round(v, 3) for k, v in choice.targets.items()})
    return choice


def _golden_section(f, low: float, high: float, evaluations: int) -> float:
    """The argmin of a unimodal ``f`` on [low, high] (the best point evaluated)."""
    ratio = (math.sqrt(5) - 1) / 2
    a, b = low, high
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    seen = {c: fc, d: fd}
    for _ in range(max(0, evaluations - 2)):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = seen[c] = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = seen[d] = f(d)
    return min(seen, key=seen.get)
