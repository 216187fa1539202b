"""One influence erasure of an adapter: edits -> ``b`` -> solve -> ``theta + x``, with before/after checks.

The fast path of docs/architecture.md#the-erasure-flow, step 4. Whether its result may be published is decided
afterwards by verification (:mod:`eraser.verify`) and the guard; this module never saves anything.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from eraser.influence import InfluenceSystem, Shard, SolveConfig
from eraser.records import Record, per_record_losses
from eraser.requests import Edit, EditRequest, apply_edits, merge_edits
from eraser.solvers import SolverReport
from eraser.update import apply_step

logger = logging.getLogger(__name__)

# Retained records whose loss the guard checks before/after (and the damping search, remediation and the
# learned test read). 64 left the reduced demo's candidate within the bound on the sample (1.043 <= 1.046)
# and past it on all of the other customers' training records (1.050 > 1.038): a small tenant is checked whole.
RETAINED_SAMPLE = 256


@dataclass
class EraseResult:
    edits: list[Edit]
    step: torch.Tensor  # x, the update applied to the LoRA parameters (p,)
    report: SolverReport
    records_after: list[Record]  # the training set as retraining would see it
    checks: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)  # seconds per stage


def retained_sample(records: Sequence[Record], edits: Sequence[Edit], size: int = RETAINED_SAMPLE) -> list[Record]:
    """A deterministic, evenly spaced sample of the records no edit touches."""
    touched = {edit.old.id for edit in edits}
    kept = [r for r in records if r.id not in touched]
    stride = max(1, len(kept) // size)
    return kept[::stride][:size]


def loss_checks(model, tokenizer, edits: Sequence[Edit], retained: Sequence[Record]) -> dict:
    """Mean loss of the affected records (old and new versions) and of a retained sample."""
    old = [edit.old for edit in edits]
    new = [edit.new for edit in edits if edit.new is not None]
    checks = {
        "affected_loss": float(per_record_losses(model, old, tokenizer).mean()),
        "retained_loss": float(per_record_losses(model, retained, tokenizer).mean()) if retained else None,
    }
    if new:
        checks["replacement_loss"] = float(per_record_losses(model, new, tokenizer).mean())
    return checks


def erase(
    model,
    tokenizer,
    records: Sequence[Record],
    requests: Sequence[EditRequest],
    config: SolveConfig,
    shard: Shard | None = None,
    system: InfluenceSystem | None = None,
    progress: Callable[[int, float], None] | None = None,
    rhs: torch.Tensor | None = None,
    before: dict | None = None,
) -> EraseResult:
    """Apply the influence update for ``requests`` (a mixture is one solve) to ``model`` in place.

    ``system`` may be passed to reuse curvature state cached for this adapter version; ``rhs`` the
    requests' ``b`` when the caller has it already (the damping search computes it once), ``before``
    the original adapter's :func:`loss_checks` when the caller measured them.
    """
    stages: dict[str, float] = {}
    started = time.perf_counter()
    edits = merge_edits(requests, records)
    retained = retained_sample(records, edits)
    before = before if before is not None else loss_checks(model, tokenizer, edits, retained)
    system = system or InfluenceSystem(model, tokenizer, records, config, shard)
    stages["prepare_s"] = time.perf_counter() - started

    mark = time.perf_counter()
    b = rhs if rhs is not None else system.gradient_of_edits(edits)  # (p,)
    stages["gradient_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    x, report = system.solve(b, progress=progress)  # raises when diverged or unconverged
    stages["solve_s"] = time.perf_counter() - mark

    apply_step(model, x)
    after = loss_checks(model, tokenizer, edits, retained)
    checks = {f"{key}_before": value for key, value in before.items()}
    checks.update({f"{key}_after": value for key, value in after.items()})
    checks.update(step_norm=float(x.norm()), rhs_norm=float(b.norm()), records_affected=len(edits))
    stages["total_s"] = time.perf_counter() - started
    logger.info(
        "influence update: %d record(s), solver %s, %d iterations, residual %.2e, affected loss %.4f -> %.4f, retained %.4f -> %.4f",
        len(edits), report.solver, report.iterations, report.relative_residual,
        checks["affected_loss_before"], checks["affected_loss_after"],
        checks["retained_loss_before"] or float("nan"), checks["retained_loss_after"] or float("nan"),
    )
    return EraseResult(edits=edits, step=x, report=report, records_after=apply_edits(records, edits),
                       checks=checks, stages=stages)
