"""Steps 3-4 of the erasure flow on one worker: the influence update, then verify and guard.

:func:`verify_and_guard` is the one function the job calls. It runs :func:`eraser.pipeline.run_influence`
on every rank (the solve is collective: HVP sums all-reduced) and :func:`eraser.pipeline.complete_erasure`
(membership test against the held-out split, remediation, exact-retrain fallback, guard) on the root
rank only. What it decides goes into the receipt and the manifest: ``path``, the solver report and
the evidence (``checks``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

from eraser.errors import VerificationFailedError
from eraser.influence import InfluenceSystem, Shard
from eraser.pipeline import PipelineConfig, complete_erasure, run_influence
from eraser.records import Record
from eraser.requests import EditRequest
from eraser.solvers import LowRankCurvature
from eraser.training import TrainConfig

from cluster.errors import GuardRejectedError

logger = logging.getLogger(__name__)

# The pipeline's "unchanged" (only held-out records named: the adapter never trained on them) has no
# receipt path of its own; the adapter is republished as is with the new data version.
RECEIPT_PATHS = {"influence": "influence", "influence+remediation": "influence+remediation", "retrain": "retrain",
                 "unchanged": None}


@dataclass
class GuardedUpdate:
    """A candidate adapter (already in the model, in place) that passed verification and the guard."""

    path: str | None  # influence | influence+remediation | retrain | None (unchanged)
    solver: dict = field(default_factory=dict)
    checks: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)


def evidence(outcome) -> dict:
    """The receipt's ``checks`` from an ErasureOutcome: tests before/after, retained bound, guard, losses."""
    if outcome is None:
        return {}
    summary = outcome.summary()
    checks = {key: value for key, value in summary.items() if key not in ("solver", "stages", "checks")}
    checks.update(summary.get("checks") or {})  # losses of affected and retained records, before and after
    guard = dict(summary.get("guard") or {})
    if guard and "passed" not in guard:
        guard["passed"] = all(bool(value) for value in guard.values())
    checks["guard"] = guard
    return checks


def verify_and_guard(
    model,
    tokenizer,
    train: Sequence[Record],
    heldout: Sequence[Record],
    requests: Sequence[EditRequest],
    config: PipelineConfig,
    recipe: TrainConfig | None = None,
    shard: Shard | None = None,
    progress: Callable[[int, float], None] | None = None,
    is_root: bool = True,
    curvature: LowRankCurvature | None = None,
) -> GuardedUpdate | None:
    """Leave in ``model`` the adapter to publish and return its evidence (root rank), or raise
    GuardRejectedError with the evidence when no path passes. Non-root ranks return None after the
    collective influence stage. ``recipe`` enables the exact-retrain fallback. ``curvature``: the
    adapter version's warmed low-rank curvature (solver "eigen"), instead of building it here."""
    system = None
    if curvature is not None:
        system = InfluenceSystem(model, tokenizer, train, config.solve, shard, cache=curvature)
    stage = run_influence(model, tokenizer, train, requests, config, heldout=heldout, shard=shard, progress=progress,
                          system=system)
    if not is_root:
        return None
    try:
        outcome = complete_erasure(model, tokenizer, stage, heldout, recipe, config)
    except VerificationFailedError as error:
        logger.warning("verification refused every candidate: %s", error)
        raise GuardRejectedError(str(error), evidence(error.outcome)) from None
    solver = {**outcome.solver.to_dict(), "config": config.solve.to_dict()} if outcome.solver else {
        "skipped": "no record the adapter trained on is affected"}
    checks = evidence(outcome)
    checks["pipeline_path"] = outcome.path
    return GuardedUpdate(path=RECEIPT_PATHS[outcome.path], solver=solver, checks=checks, stages=dict(outcome.stages))
