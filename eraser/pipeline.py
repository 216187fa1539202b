"""``verified_erase``: the default erasure path that everyone calls (erasure flow, steps 3-4).

    influence update: the cached low-rank curvature's solution, its damping chosen per request on the
      *steering* half of the reference (eraser.damping), escalated while retained records degrade
      -> membership test on the *deciding* half (look 1)  -- passes, retained within bound -> "influence"
      -> remediation steered by the steering half, then the deciding half (look 2)   -> "influence+remediation"
      -> exact retrain (train_lora on a fresh add_lora with the tenant's recipe)      -> "retrain"
      -> guard: finite; influence paths also within the retained bound and passed; otherwise
         VerificationFailedError, and nothing may be published.

The deciding half is looked at most ``decision_looks`` times (1, or 2 with remediation), each at
``alpha / decision_looks`` (Bonferroni), so a published pass is not chosen by noise on the records that
judged it. The retrain is what the estimate stands in for: it is published without the membership
test gating it (the test is run and reported), since rejecting an exact retrain can only be a false
failure of the test; issue 12 measured it happening.

Split for the cluster layer: :func:`run_influence` is collective (every Ray Train worker calls it
with its ``Shard``, or with a prebuilt sharded :class:`InfluenceSystem`; its decisions depend only
on values every rank holds identically), then rank 0 alone calls :func:`complete_erasure`.
:func:`verified_erase` is the two in one process.

Records held out at onboarding (:func:`eraser.reference.split_heldout`) were never trained on: a
request may name them (the tenant's dataset still holds them), but they take no part in the update;
they are reported as ``heldout_affected`` and left out of the reference population.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Sequence

import torch

from eraser.damping import DampingChoice, DampingSearch, choose_damping
from eraser.erase import EraseResult, erase, loss_checks, retained_sample
from eraser.errors import (
    EraserError,
    SolverDivergedError,
    SolverNotConvergedError,
    VerificationFailedError,
    VerificationUnavailableError,
)
from eraser.influence import InfluenceSystem, Shard, SolveConfig
from eraser.outcome import PATHS, ErasureOutcome, failure_reason, guard
from eraser.records import Record
from eraser.reference import steering_split, subject_key
from eraser.remediate import RemediationConfig, remediate
from eraser.requests import Edit, EditRequest, apply_edits, merge_edits, restrict_requests
from eraser.training import TrainConfig, retrain_adapter
from eraser.update import lora_vector, set_lora_vector
from eraser.verify import VerifyConfig, VerifyResult, verify

logger = logging.getLogger(__name__)

# Moved by concept, importable from here as before: the outcome and its guard (eraser.outcome), the
# requests' restriction to the training split (eraser.requests), the exact retrain (eraser.training).
__all__ = ["PATHS", "DEFAULT_DAMPING", "PipelineConfig", "ReferenceHalves", "InfluenceStage", "ErasureOutcome",
           "restrict_requests", "run_influence", "complete_erasure", "verified_erase", "retrain_adapter"]


# Relative damping used when the search cannot run (another solver than the bare low-rank solution, or
# nothing to steer by): the value the verify_regimes benchmark measured best for CG (issue 8).
DEFAULT_DAMPING = 0.01


@dataclass(frozen=True)
class PipelineConfig:
    """Every knob of the verified erasure; the defaults are the measured ones (benchmarks/README.md)."""

    # The fast path: the Woodbury solution of the cached low-rank Gauss-Newton curvature (built once per
    # adapter version, warmed by the service), no CG refinement; its damping chosen per request by the
    # search below. On TOFU (800 records, forget01) it is what lands nearest the retrain at a tenth of
    # its time; PCG towards the exact damped system moved further from the gold (benchmarks/README.md).
    # eval_size: the batch the low-rank solution's residual is measured on (one HVP; reported, not gated).
    solve: SolveConfig = field(default_factory=lambda: SolveConfig(solver="eigen", damping=DEFAULT_DAMPING,
                                                                   max_iters=0, eval_size=16))
    search: DampingSearch | None = field(default_factory=DampingSearch)  # None: solve.damping as given
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    remediation: RemediationConfig = field(default_factory=RemediationConfig)
    retained_rel: float = 0.10  # guard: retained NLL after <= before * (1 + rel) + abs
    retained_abs: float = 0.05
    # Damping multipliers tried while the update degrades retained records past the guard (or the solve
    # fails). Measured: correcting memorised answers, b carries the new responses' large gradients;
    # retained NLL 0.10 went to 6.7 at 0.03, 2.5 at 0.3, and stayed 0.16 at 3.
    damping_escalation: tuple[float, ...] = (3.0, 10.0, 100.0, 1000.0)
    verify_original: bool = False  # also test the original adapter (evidence only; one more test's time)
    remediate: bool = True
    retrain: bool = True
    require_verification: bool = True  # no held-out reference: raise rather than publish unverified

    def __post_init__(self) -> None:
        if self.retained_rel < 0 or self.retained_abs < 0:
            raise EraserError(f"retained_rel/retained_abs must be >= 0, got {self.retained_rel!r}/{self.retained_abs!r}")
        if any(not (f > 1 and math.isfinite(f)) for f in self.damping_escalation):
            raise EraserError(f"damping_escalation factors must be finite and > 1, got {self.damping_escalation!r}")

    def retained_bound(self, before: float) -> float:
        return before * (1 + self.retained_rel) + self.retained_abs

    @property
    def decision_looks(self) -> int:
        """How many candidates the deciding half may judge: the influence update, and the remediated one."""
        return 2 if self.remediate else 1

    @property
    def searches_damping(self) -> bool:
        """The search needs the bare low-rank solution (one Woodbury product per damping tried)."""
        return self.search is not None and self.solve.solver == "eigen" and self.solve.max_iters == 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ReferenceHalves:
    """The reference (held-out records not being erased), split into steering and deciding halves."""

    steering: list[Record]
    deciding: list[Record]
    shared: bool  # too few records to split: both halves are the whole reference (the receipt says so)

    @classmethod
    def of(cls, heldout: Sequence[Record], touched: set[str], config: PipelineConfig) -> "ReferenceHalves":
        reference = [r for r in heldout if r.id not in touched]
        steering, deciding = steering_split(reference, config.verify.seed)
        if min(len(steering), len(deciding)) < config.verify.min_reference:
            return cls(steering=reference, deciding=reference, shared=True)
        return cls(steering=steering, deciding=deciding, shared=False)

    def describe(self) -> dict:
        return {"steering_records": len(self.steering), "deciding_records": len(self.deciding),
                "steering_subjects": len({subject_key(r) for r in self.steering}),
                "deciding_subjects": len({subject_key(r) for r in self.deciding}), "shared": self.shared}


@dataclass
class InfluenceStage:
    """What :func:`run_influence` leaves for :func:`complete_erasure` (rank 0)."""

    edits: list[Edit]  # edits of training records (held-out ones removed)
    heldout_affected: list[str]  # held-out record ids the requests name (data deletion only)
    records_after: list[Record]
    retained: list[Record]  # the sample the guard measures
    retained_before: float
    checks_before: dict  # eraser.erase.loss_checks of the original adapter
    theta_before: torch.Tensor  # the original adapter's LoRA vector (p,)
    reference: ReferenceHalves | None = None
    trained_subjects: set[str] = field(default_factory=set)  # subjects of records_after
    result: EraseResult | None = None  # None: every solve failed (or nothing to update)
    search: DampingChoice | None = None  # the damping search, when it ran
    attempts: list[dict] = field(default_factory=list)  # one per damping tried
    stages: dict = field(default_factory=dict)


# -- stage 1 (every rank) -----------------------------------------------------------------------
def run_influence(
    model,
    tokenizer,
    records: Sequence[Record],
    requests: Sequence[EditRequest],
    config: PipelineConfig = PipelineConfig(),
    heldout: Sequence[Record] = (),
    shard: Shard | None = None,
    system: InfluenceSystem | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> InfluenceStage:
    """The influence update, applied to ``model`` in place. Collective.

    The damping: chosen by :func:`eraser.damping.choose_damping` on the steering half (when the solver is
    the bare low-rank solution), else ``config.solve.damping``; then times each ``damping_escalation``
    factor while the solve fails or leaves the retained sample's NLL above the guard bound. Keeps the
    first within it (else the last that solved, which remediation then repairs).
    """
    started = time.perf_counter()
    train_requests, heldout_affected = restrict_requests(requests, records, heldout)
    edits = merge_edits(train_requests, records) if train_requests else []
    retained = retained_sample(records, edits)
    theta_before = lora_vector(model)
    checks_before = loss_checks(model, tokenizer, edits, retained) if edits else {}
    retained_before = checks_before.get("retained_loss") or 0.0
    records_after = apply_edits(records, edits)
    stage = InfluenceStage(edits=edits, heldout_affected=heldout_affected, records_after=records_after,
                           retained=retained, retained_before=retained_before, checks_before=checks_before,
                           theta_before=theta_before,
                           reference=ReferenceHalves.of(heldout, {*heldout_affected, *(e.old.id for e in edits)},
                                                        config),
                           trained_subjects={r.subject for r in records_after if r.subject is not None})
    if not edits:
        stage.stages["influence_s"] = time.perf_counter() - started
        return stage
    bound = config.retained_bound(retained_before)
    system = system or InfluenceSystem(model, tokenizer, records, config.solve, shard)
    mark = time.perf_counter()
    b = system.gradient_of_edits(edits)
    base_damping = system.config.damping
    stage.stages["gradient_s"] = time.perf_counter() - mark
    if config.searches_damping:
        mark = time.perf_counter()
        stage.search = choose_damping(model, tokenizer, system, b, edits, stage.reference.steering, retained,
                                      stage.trained_subjects, config.search, calibrate=config.verify.calibrate)
        stage.stages["damping_search_s"] = time.perf_counter() - mark
        if stage.search is not None:
            base_damping = stage.search.damping
    best: tuple[EraseResult, torch.Tensor] | None = None
    original = system.config
    for factor in (1.0, *config.damping_escalation):
        system.config = replace(original, damping=base_damping * factor)
        set_lora_vector(model, theta_before)
        attempt = {"damping": system.config.damping, "damping_mode": system.config.damping_mode}
        try:
            result = erase(model, tokenizer, records, train_requests, system.config, shard=shard,
                           system=system, progress=progress, rhs=b, before=checks_before)
        except (SolverDivergedError, SolverNotConvergedError) as error:
            attempt.update(outcome="solver failed", error=str(error))
            stage.attempts.append(attempt)
            logger.warning("influence solve at damping %.3g failed: %s", system.config.damping, error)
            continue
        after = result.checks["retained_loss_after"] or 0.0
        attempt.update(outcome="ok" if after <= bound else "retained degraded", retained_after=after,
                       iterations=result.report.iterations, relative_residual=result.report.relative_residual)
        stage.attempts.append(attempt)
        best = (result, lora_vector(model))
        if after <= bound:
            break
        logger.warning("influence update at damping %.3g: retained NLL %.4f above bound %.4f; escalating",
                       system.config.damping, after, bound)
    system.config = original
    if best is None:
        set_lora_vector(model, theta_before)
    else:
        stage.result = best[0]
        set_lora_vector(model, best[1])
    stage.stages["influence_s"] = time.perf_counter() - started
    return stage


# -- stage 2 (rank 0) ---------------------------------------------------------------------------
def complete_erasure(
    model,
    tokenizer,
    stage: InfluenceStage,
    heldout: Sequence[Record],
    recipe: TrainConfig | None = None,
    config: PipelineConfig = PipelineConfig(),
    base_factory: Callable[[], torch.nn.Module] | None = None,
    gold=None,
) -> ErasureOutcome:
    """Verify the influence candidate, remediate or retrain when needed, guard, and return the outcome.

    ``model`` ends holding the adapter to publish (its LoRA weights replaced in place on the retrain
    path). ``recipe``: the tenant's training recipe, for the retrain fallback (None: no retrain).
    ``heldout``: the tenant's held-out records (the stage split them already; kept for the signature).
    ``base_factory``: returns a fresh base model for the retrain (default: a copy of ``model``'s
    base with the adapter removed). ``gold``: benchmarks only, reported next to the statistics.
    Raises :class:`VerificationFailedError` (and leaves ``model`` unusable) when no path passes.
    """
    started = time.perf_counter()
    stages = dict(stage.stages)
    halves = stage.reference or ReferenceHalves.of(heldout, set(stage.heldout_affected), config)
    decide = replace(config.verify, alpha=config.verify.alpha / config.decision_looks)
    outcome = ErasureOutcome(
        path="unchanged", verified=True, edits=stage.edits, records_after=stage.records_after,
        heldout_affected=stage.heldout_affected, retained_before=stage.retained_before, retained_after=None,
        retained_bound=config.retained_bound(stage.retained_before), verification_before=None,
        verification_influence=None, verification=None, solver=stage.result.report if stage.result else None,
        damping=stage.result.report.extra.get("damping_relative") if stage.result else None,
        attempts=stage.attempts, search=stage.search, stages=stages,
        reference={**halves.describe(), "decision_looks": config.decision_looks, "decision_alpha": decide.alpha,
                   "rule": "the steering half chooses the damping and steers remediation; the deciding half "
                           "judges each candidate once, at alpha / decision_looks (Bonferroni)"},
    )
    if not stage.edits:  # only held-out records named: the adapter never trained on them
        outcome.retained_after = stage.retained_before
        outcome.guard = {"unchanged": True}
        stages["total_s"] = stages.get("influence_s", 0.0) + time.perf_counter() - started
        return outcome

    def check(reference: Sequence[Record], level: VerifyConfig) -> VerifyResult:
        return verify(model, tokenizer, stage.edits, reference, level, retained=stage.retained, gold=gold,
                      trained_subjects=stage.trained_subjects)

    mark = time.perf_counter()
    if config.verify_original:
        candidate = lora_vector(model)
        set_lora_vector(model, stage.theta_before)
        outcome.verification_before = check(halves.deciding, decide)
        set_lora_vector(model, candidate)
    if stage.result is not None:
        outcome.verification_influence = check(halves.deciding, decide)
    stages["verify_s"] = time.perf_counter() - mark
    probe = outcome.verification_influence or outcome.verification_before
    if probe is not None and not probe.verifiable or len(halves.deciding) < config.verify.min_reference:
        reason = probe.reason if probe is not None else (
            f"could not verify: {len(halves.deciding)} held-out reference record(s), at least "
            f"{config.verify.min_reference} needed")
        if config.require_verification:
            raise VerificationUnavailableError(reason, outcome=outcome)
        if stage.result is None:
            raise VerificationFailedError("influence solve failed at every damping and no reference exists "
                                          "to verify a remediation or retrain", outcome=outcome)
        outcome.verified = False
        return guard(model, tokenizer, outcome, "influence", outcome.verification_influence, stage, started)

    if stage.result is not None:
        retained = stage.result.checks["retained_loss_after"] or 0.0  # the candidate in the model now
        if outcome.verification_influence.passed and retained <= outcome.retained_bound:
            return guard(model, tokenizer, outcome, "influence", outcome.verification_influence, stage, started)
        if config.remediate:
            mark = time.perf_counter()
            outcome.remediation = remediate(
                model, tokenizer, stage.edits, stage.records_after, halves.steering, stage.retained,
                outcome.retained_bound, config.remediation, config.verify, lr=recipe.lr if recipe else None,
                trained_subjects=stage.trained_subjects)
            stages["remediation_s"] = time.perf_counter() - mark
            if outcome.remediation.passed and outcome.remediation.steps == 0:
                # The steering half passed the very candidate the deciding half rejected: a second look
                # would judge the same weights on the same records again (measured on TOFU forget05: 18 s
                # for the same failure). Nothing was remediated; the retrain follows.
                logger.warning("remediation took no step (the steering half passes the candidate the deciding "
                               "half rejected): no second look")
            elif outcome.remediation.passed:
                mark = time.perf_counter()
                result = check(halves.deciding, decide)
                stages["verify_s"] += time.perf_counter() - mark
                if result.passed:
                    return guard(model, tokenizer, outcome, "influence+remediation", result, stage, started)
                outcome.verification = result
                logger.warning("remediation passed on the steering half but not on the deciding half: %s",
                               result.reason)
    if not (config.retrain and recipe is not None):
        raise VerificationFailedError(failure_reason("no retrain fallback (no recipe or retrain disabled)", outcome),
                                      outcome=outcome)
    mark = time.perf_counter()
    outcome.retrain = retrain_adapter(model, tokenizer, stage.records_after, recipe, base_factory)
    stages["retrain_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    result = check(halves.deciding, decide)  # reported: a retrain is the target, not a candidate
    stages["verify_s"] += time.perf_counter() - mark
    return guard(model, tokenizer, outcome, "retrain", result, stage, started)


def verified_erase(
    model,
    tokenizer,
    records: Sequence[Record],
    requests: Sequence[EditRequest],
    heldout: Sequence[Record],
    recipe: TrainConfig | None = None,
    config: PipelineConfig = PipelineConfig(),
    shard: Shard | None = None,
    system: InfluenceSystem | None = None,
    base_factory: Callable[[], torch.nn.Module] | None = None,
    progress: Callable[[int, float], None] | None = None,
    gold=None,
) -> ErasureOutcome:
    """Erase ``requests`` from the adapter ``model`` (trained on ``records``, never on ``heldout``).

    On return ``model`` holds an adapter that passed the membership test and the guard (or the exact
    retrain); the outcome says which path produced it and with what evidence. Raises
    VerificationFailedError otherwise (VerificationUnavailableError when there is no held-out
    reference), or the request's own errors.
    """
    logger.info("verified erasure of request(s) %s: %d training record(s), %d held-out",
                [r.request_id for r in requests], len(records), len(heldout))
    _, touched = restrict_requests(requests, records, heldout)
    reference = len(heldout) - len(set(touched))
    if config.require_verification and reference < config.verify.min_reference:
        # Fail before the solve: without a reference no adapter could be verified.
        raise VerificationUnavailableError(
            f"could not verify: {reference} held-out reference record(s), at least {config.verify.min_reference} "
            "needed (train with a held-out split, --heldout-fraction > 0)")
    stage = run_influence(model, tokenizer, records, requests, config, heldout=heldout, shard=shard, system=system,
                          progress=progress)
    return complete_erasure(model, tokenizer, stage, heldout, recipe, config, base_factory=base_factory, gold=gold)
