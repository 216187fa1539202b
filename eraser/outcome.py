"""What a verified erasure publishes and proves: :class:`ErasureOutcome` (the evidence the receipt and
eraser.json record) and :func:`guard`, the last gate before publishing, which fills it in or raises."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

from eraser.curvature import lora_parameters
from eraser.damping import DampingChoice
from eraser.erase import loss_checks
from eraser.errors import VerificationFailedError
from eraser.records import Record
from eraser.remediate import RemediationReport
from eraser.requests import Edit
from eraser.solvers import SolverReport
from eraser.training import TrainReport
from eraser.verify import VerifyResult

if TYPE_CHECKING:  # the pipeline imports this module; the stage is only a type here
    from eraser.pipeline import InfluenceStage

logger = logging.getLogger("eraser.pipeline")  # the pipeline's log, where operators look for it

PATHS: tuple[str, ...] = ("influence", "influence+remediation", "retrain", "unchanged")


@dataclass
class ErasureOutcome:
    """The evidence of one verified erasure: what the receipt and eraser.json record."""

    path: str  # one of PATHS
    verified: bool  # False only when require_verification=False and no reference existed
    edits: list[Edit]
    records_after: list[Record]
    heldout_affected: list[str]
    retained_before: float | None
    retained_after: float | None
    retained_bound: float | None
    verification_before: VerifyResult | None  # the original adapter (verify_original only)
    verification_influence: VerifyResult | None  # after the influence update (look 1)
    verification: VerifyResult | None  # the published candidate
    solver: SolverReport | None
    damping: float | None  # relative damping of the accepted influence solve
    attempts: list[dict] = field(default_factory=list)
    search: DampingChoice | None = None
    reference: dict = field(default_factory=dict)  # ReferenceHalves.describe() and the looks
    remediation: RemediationReport | None = None
    retrain: TrainReport | None = None
    guard: dict = field(default_factory=dict)
    checks: dict = field(default_factory=dict)  # affected/retained/replacement loss, before and after
    stages: dict = field(default_factory=dict)  # seconds per stage

    @property
    def records_affected(self) -> list[str]:
        return [edit.old.id for edit in self.edits]

    def summary(self) -> dict:
        """JSON-ready: path, test statistics before/after, retained before/after, time per stage."""
        brief = lambda v: v.brief() if v is not None else None  # noqa: E731
        return {
            "path": self.path,
            "verified": self.verified,
            "records_affected": self.records_affected,
            "heldout_affected": self.heldout_affected,
            "verification": {"before": brief(self.verification_before),
                             "influence": brief(self.verification_influence),
                             "after": brief(self.verification)},
            "reference": self.reference,
            "retained": {"before": self.retained_before, "after": self.retained_after, "bound": self.retained_bound},
            "solver": self.solver.to_dict() if self.solver else None,
            "damping": self.damping,
            "damping_search": self.search.to_dict() if self.search else None,
            "damping_attempts": self.attempts,
            "remediation": self.remediation.to_dict() if self.remediation else None,
            "retrain": ({k: v for k, v in asdict(self.retrain).items() if k != "loss_history"}
                        if self.retrain else None),
            "guard": self.guard,
            "checks": self.checks,
            "stages": self.stages,
        }



def failure_reason(why: str, outcome: ErasureOutcome) -> str:
    last = outcome.remediation.verification if outcome.remediation and outcome.remediation.verification else (
        outcome.verification_influence or outcome.verification_before)
    solver = [f"damping {a['damping']:.3g}: {a.get('error', a['outcome'])}" for a in outcome.attempts
              if a["outcome"] != "ok"]
    return (f"no adapter passed verification ({why}); last test: {last.reason if last else 'none'}"
            + (f"; influence attempts: {'; '.join(solver)}" if solver else ""))



def guard(model, tokenizer, outcome: ErasureOutcome, path: str, result: VerifyResult | None,
          stage: InfluenceStage, started: float) -> ErasureOutcome:
    """The last gate before publishing. Influence paths: finite, solved (converged, or the exact solution
    of the cached low-rank system), retained NLL within the bound, membership test passed. The retrain
    is the target itself: only finiteness gates it; its test and retained NLL are reported."""
    mark = time.perf_counter()
    outcome.path = path
    outcome.verification = result
    if path == "influence" and stage.result is not None:  # the model holds the update erase() measured
        after = {key[: -len("_after")]: value for key, value in stage.result.checks.items() if key.endswith("_after")}
    else:
        after = loss_checks(model, tokenizer, stage.edits, stage.retained)
    outcome.retained_after = after["retained_loss"] or 0.0
    outcome.checks = {f"{key}_before": value for key, value in stage.checks_before.items()}
    outcome.checks.update({f"{key}_after": value for key, value in after.items()})
    outcome.checks["records_affected"] = len(stage.edits)
    finite = all(bool(torch.isfinite(p).all()) for p in lora_parameters(model))
    if path == "retrain":
        outcome.guard = {"finite": finite}
        outcome.checks["retrain_reported"] = {
            "retained_within_bound": finite and outcome.retained_after <= outcome.retained_bound,
            "membership_test_passed": bool(result is not None and result.passed)}
    else:
        report = stage.result.report if stage.result else None
        outcome.guard = {
            "finite": finite,
            "converged": bool(report and (report.converged or report.extra.get("lowrank_exact"))),
            "retained_within_bound": finite and outcome.retained_after <= outcome.retained_bound,
            "membership_test_passed": bool(result is not None and result.passed) or not outcome.verified,
        }
    outcome.stages["guard_s"] = time.perf_counter() - mark
    outcome.stages["total_s"] = outcome.stages.get("influence_s", 0.0) + time.perf_counter() - started
    failed = [name for name, ok in outcome.guard.items() if not ok]
    if failed:
        detail = (f"retained NLL {outcome.retained_after:.4f} > bound {outcome.retained_bound:.4f}"
                  if "retained_within_bound" in failed else (result.reason if result else ""))
        raise VerificationFailedError(f"guard refused the {path} adapter ({', '.join(failed)}): {detail}",
                                      outcome=outcome)
    logger.info("verified erasure: path %s, %d record(s), retained NLL %.4f -> %.4f (bound %.4f), %.1fs",
                path, len(outcome.edits), outcome.retained_before, outcome.retained_after, outcome.retained_bound,
                outcome.stages["total_s"])
    return outcome
