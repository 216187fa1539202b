"""Step 3-4 of the erasure flow on one worker: the influence update, then verify and guard.

:func:`verify_and_guard` is the one function the job calls; everything it decides goes into the
receipt (``path``, solver report, checks). It runs on every rank (the solve is collective); the
checks that are not collective (the membership test) run on the root rank only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from eraser.curvature import lora_parameters
from eraser.erase import erase, retained_sample
from eraser.influence import Shard, SolveConfig
from eraser.records import Record
from eraser.requests import EditRequest

from cluster.config import GuardPolicy
from cluster.errors import GuardRejectedError

logger = logging.getLogger(__name__)


@dataclass
class GuardedUpdate:
    """A candidate adapter (already applied to the model in place) that passed the guard."""

    path: str  # influence | influence+remediation | retrain
    solver: dict = field(default_factory=dict)
    checks: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)


def retained_bound(before: float | None, policy: GuardPolicy) -> float | None:
    """The largest retained loss the guard accepts after an update, given the loss before it."""
    if before is None:
        return None
    return before * policy.retained_loss_ratio + policy.retained_loss_slack


def verify_and_guard(
    model,
    tokenizer,
    train: Sequence[Record],
    heldout: Sequence[Record],
    requests: Sequence[EditRequest],
    solve: SolveConfig,
    policy: GuardPolicy,
    shard: Shard | None = None,
    progress: Callable[[int, float], None] | None = None,
    is_root: bool = True,
) -> GuardedUpdate:
    """Apply the influence update for ``requests`` to ``model`` in place; raise GuardRejectedError
    (with the checks) when the result must not be published: non-finite, unconverged, retained
    loss past the bound, or (``policy.require_forgotten``) failing the membership test.

    ``requests`` holds only edits of records the adapter trained on; empty means the batch touched
    held-out records only and the adapter stays as it is.
    """
    if not requests:
        return GuardedUpdate(path="influence", solver={"skipped": "no record the adapter trained on is affected"},
                             checks={"records_affected": 0, "guard": {"passed": True, "failures": []}})
    result = erase(model, tokenizer, train, requests, solve, shard=shard, progress=progress)
    checks = dict(result.checks)
    solver = {**result.report.to_dict(), "config": solve.to_dict()}
    stages = dict(result.stages)
    failures: list[str] = []

    if not all(bool(torch.isfinite(p).all()) for p in lora_parameters(model)):
        failures.append("non-finite adapter weights")
    if policy.require_converged and not result.report.converged:
        failures.append(f"solver not converged (residual {result.report.relative_residual:.3g} > tol {result.report.tol:g})")
    bound = retained_bound(checks.get("retained_loss_before"), policy)
    after = checks.get("retained_loss_after")
    if bound is not None and after is not None and not (after <= bound):
        failures.append(f"retained loss {after:.4f} above the bound {bound:.4f} "
                        f"(before {checks['retained_loss_before']:.4f})")
    checks["retained_loss_bound"] = bound

    if policy.verify and is_root:
        from eraser.verify import VerifyConfig, verify

        mark = time.perf_counter()
        outcome = verify(model, tokenizer, result.edits, heldout, VerifyConfig(seed=solve.seed),
                         retained=retained_sample(train, result.edits))
        stages["verify_s"] = time.perf_counter() - mark
        checks["membership"] = outcome.brief()
        if policy.require_forgotten and not outcome.passed:
            failures.append(f"membership test: {outcome.reason}")

    checks["guard"] = {"passed": not failures, "failures": failures, "policy": policy.to_dict()}
    if failures:
        logger.warning("guard rejected the candidate: %s", "; ".join(failures))
        raise GuardRejectedError("guard rejected the candidate adapter: " + "; ".join(failures), checks)
    return GuardedUpdate(path="influence", solver=solver, checks=checks, stages=stages)
