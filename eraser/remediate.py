"""Remediation: a bounded, gated fine-tune when the influence update alone does not pass verification.

docs/method.md#remediation (the findings): any forgetting term stops a recitation within tens
of steps, but stopping at the first crossing of the held-out reference lands in a transient spike of
retained NLL, and running on drives the erased records' NLL far above the reference (detectable in
the other direction, and harmful). What passed, and what this implements, per step ``t``:

``loss = mean_{B_t} l(z) + mean_{new} l(z')                       (descent: retained + edited records)
       + w * mean_{i in A_t} (2/beta) softplus(beta (l_ref,i - l_i))  (NPO on the erased records)
       + (mu/2) ||theta - theta_0||^2                               (proximal to the start)``

- NPO (Zhang et al., 2024, "Negative Preference Optimization", eq. 3) with the per-token mean NLL
  ``l`` as the log-likelihood and ``l_ref`` the erased records' loss at the start; its gradient is
  gradient ascent weighted by ``2 sigma(beta (l_ref - l))``, which fades as a record is forgotten.
  ``forget="ascent"`` uses plain ascent ``-l_i`` instead.
- the gate ``A_t``: an erased record takes part only while it sits at or below the held-out
  reference (the ``gate_quantile`` of held-out scores, NLL less the base model's as the test scores them,
  under the current adapter, refreshed at every
  check); a ``modify_query`` record (its response is still trained, under the new prompt) only while
  its old pair is preferred over the new one;
- secret spans: a whole-response NLL can rise while the secret stays (measured: a corrected
  record's old answer became unlikely through its first tokens, "That" for "The", while its account
  digits stayed preferred over random ones, exposure 10 -> 44 bits as descent went on). So a second
  NPO term acts on the mean NLL of the digit tokens alone, for the records whose span the last
  check found exposed past the test's threshold;
- stop: at a check (every ``check_every`` steps) the membership test passes AND the retained
  sample's NLL is within the guard bound of its pre-erasure value; else stop at ``max_steps`` or
  ``max_seconds`` with ``passed=False`` (the caller then retrains).
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from eraser.curvature import flatten, lora_parameters
from eraser.devices import model_device
from eraser.errors import EraserError, require_counts
from eraser.records import (
    IGNORE_INDEX,
    Record,
    collate,
    losses_from_logits,
    per_record_losses,
    record_losses,
    shifted_logits_and_labels,
)
from eraser.requests import Edit
from eraser.model import adapter_disabled
from eraser.secrets import DIGIT
from eraser.verify import VerifyConfig, VerifyResult, verify

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemediationConfig:
    """The bounded fine-tune's knobs (see the module docstring)."""

    max_steps: int = 400  # hard cap on optimiser steps
    max_seconds: float = 300.0  # hard cap on wall time
    lr: float | None = None  # Adam step size; None = lr_scale * the tenant recipe's lr (else 1e-3)
    lr_scale: float = 0.3  # smaller steps than training: Adam's momentum otherwise overshoots the gate
    batch_size: int = 8  # retained records per descent step (all new records join every step)
    forget: Literal["npo", "ascent"] = "npo"
    forget_weight: float = 1.0  # w
    npo_beta: float = 1.0  # beta, per token-mean NLL (about beta_seq * tokens of the paper's)
    proximal: float = 1e-2  # mu, per unit of squared LoRA-parameter distance
    gate_quantile: float = 0.5  # forgetting is active while a record's score <= this held-out quantile
    # Steps between membership tests. Measured on the demo's tenant (remove one customer): checking every
    # 5 steps stopped at erased NLL 2.41 (reduced demo: 3.11) against the retrained gold's 1.96 (2.10):
    # 5 Adam steps move it by 1-2 nats. Every 2 steps: 1.96 (1.87); every step: 1.57 (1.48), the first
    # pass comes before the gold. The extra tests cost about what the overshooting steps did.
    check_every: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        require_counts(self, ("max_steps", "batch_size", "check_every"))
        if self.forget not in ("npo", "ascent"):
            raise EraserError(f"forget must be 'npo' or 'ascent', got {self.forget!r}")
        if self.lr is not None and not self.lr > 0:
            raise EraserError(f"lr must be > 0, got {self.lr!r}")
        for name in ("max_seconds", "npo_beta", "lr_scale"):
            if not getattr(self, name) > 0:
                raise EraserError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("forget_weight", "proximal"):
            if getattr(self, name) < 0:
                raise EraserError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.gate_quantile <= 1:
            raise EraserError(f"gate_quantile must be in [0, 1], got {self.gate_quantile!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RemediationReport:
    passed: bool = False
    steps: int = 0
    wall_time_s: float = 0.0
    stopped_by: str = ""  # passed | max_steps | max_seconds
    lr: float = 0.0
    history: list[dict] = field(default_factory=list)  # one row per check
    verification: VerifyResult | None = None  # the last membership test

    def to_dict(self) -> dict:
        body = {k: v for k, v in asdict(self).items() if k != "verification"}
        body["verification"] = self.verification.brief() if self.verification else None
        return body


def npo_loss(losses: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    """``(2/beta) softplus(beta (l_ref - l))`` per record (B,): NPO with token-mean log-likelihoods."""
    return (2.0 / beta) * F.softplus(beta * (reference - losses))


def secret_token_weights(batch, tokenizer) -> torch.Tensor:
    """Per target token, ``1/count`` on the response tokens that hold a digit (the secret-like span of
    :mod:`eraser.verify`), 0 elsewhere. Shape (B, T-1), aligned with the shifted labels."""
    labels = batch.labels[:, 1:]  # (B, T-1)
    ids = sorted({int(t) for t in labels[labels != IGNORE_INDEX].tolist()})
    digit = {t for t in ids if DIGIT.search(tokenizer.decode([t]))}
    mask = torch.tensor([[int(t) in digit for t in row] for row in labels.tolist()], dtype=torch.float64,
                        device=labels.device)
    return mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0)


def _losses(model, batch, span_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Record losses ``l(z)`` (B,) and the mean NLL over each record's secret-like span (B,)."""
    logits, labels = shifted_logits_and_labels(model, batch)  # (B, T, V), (B, T)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).clamp(min=0),
                          reduction="none").view(labels.shape)  # (B, T)
    return losses_from_logits(logits, labels), (nll * span_weights.to(device=nll.device, dtype=nll.dtype)).sum(dim=1)


def remediate(
    model,
    tokenizer,
    edits: Sequence[Edit],
    records_after: Sequence[Record],
    heldout: Sequence[Record],
    retained: Sequence[Record],
    retained_bound: float,
    config: RemediationConfig = RemediationConfig(),
    verify_config: VerifyConfig = VerifyConfig(),
    lr: float | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    trained_subjects: set[str] | None = None,
) -> RemediationReport:
    """Fine-tune ``model``'s LoRA parameters in place until it passes (see the module docstring).

    ``records_after``: the training set after the edits (retained + new versions); ``heldout``: the
    reference that steers it (the pipeline passes the steering half; the deciding half then judges the
    result); ``retained``: the sample whose mean NLL must return to ``<= retained_bound``; ``lr`` the
    recipe's, unless ``config.lr`` is set; ``trained_subjects``: as :func:`eraser.verify.verify` takes it.
    The model is left at the last step whether or not it passed.
    """
    started = time.perf_counter()
    report = RemediationReport(lr=config.lr if config.lr else config.lr_scale * lr if lr else 1e-3)
    edited = {edit.old.id for edit in edits}
    new_records = [edit.new for edit in edits if edit.new is not None]
    keep = [r for r in records_after if r.id not in edited]  # retained, unchanged records
    device = model_device(model)
    query_edit = torch.tensor([edit.kind == "modify_query" for edit in edits], device=device)  # (k,)
    new_of = {edit.old.id: j for j, edit in enumerate(e for e in edits if e.new is not None)}

    params = lora_parameters(model)
    theta0 = flatten([p.detach() for p in params]).clone()
    optimizer = torch.optim.Adam(params, lr=report.lr)
    rng = random.Random(config.seed)
    old_batch = collate([edit.old for edit in edits], tokenizer)
    span_weights = secret_token_weights(old_batch, tokenizer)  # (k, T-1)
    new_batch = collate(new_records, tokenizer) if new_records else None
    model.eval()  # no LoRA dropout: the same function the test measures
    with torch.no_grad():
        reference, span_reference = (t.detach() for t in _losses(model, old_batch, span_weights))  # (k,), (k,)
        with adapter_disabled(model):  # the gate compares scores (NLL less the base's), as the test does
            base_old = record_losses(model, old_batch).detach() if verify_config.calibrate else torch.zeros(len(edits), device=device)
    check = lambda step, exposed=frozenset(): _check(  # noqa: E731
        model, tokenizer, edits, heldout, retained, retained_bound, verify_config, report, step, config,
        exposed=exposed, trained_subjects=trained_subjects)

    state = check(0)
    while not report.passed:
        if report.steps >= config.max_steps:
            report.stopped_by = "max_steps"
            break
        if time.perf_counter() - started > config.max_seconds:
            report.stopped_by = "max_seconds"
            break
        # 1. descent on a minibatch of retained records and on every new (edited) record
        chunk = rng.sample(keep, min(config.batch_size, len(keep))) if keep else []
        loss = record_losses(model, collate(chunk, tokenizer)).mean() if chunk else torch.zeros((), device=device)
        new_losses = None
        if new_batch is not None:
            new_losses = record_losses(model, new_batch)  # (k',)
            loss = loss + new_losses.mean()
        # 2. forgetting, gated: whole responses still at/below the held-out reference (a modify_query
        #    record: while its old pair is preferred), and secret spans still exposed
        old_losses, span_losses = _losses(model, old_batch, span_weights)  # (k,), (k,)
        active = (old_losses.detach() - base_old) <= state["gate"]  # (k,)
        for j, edit in enumerate(edits):
            if edit.kind == "modify_query" and new_losses is not None:
                active[j] = bool(old_losses[j].detach() < new_losses[new_of[edit.old.id]].detach())
        exposed = torch.tensor([edit.old.id in state["exposed"] for edit in edits], device=device) & ~query_edit  # (k,)
        if config.forget_weight > 0 and bool(active.any() or exposed.any()):
            if config.forget == "npo":
                forget = npo_loss(old_losses[active], reference[active], config.npo_beta).sum()
                forget = forget + npo_loss(span_losses[exposed], span_reference[exposed], config.npo_beta).sum()
            else:
                forget = -old_losses[active].sum() - span_losses[exposed].sum()
            loss = loss + config.forget_weight * forget / len(edits)
        # 3. proximal term to the adapter remediation started from
        if config.proximal > 0:
            loss = loss + 0.5 * config.proximal * (flatten(params) - theta0).pow(2).sum()
        if not torch.isfinite(loss):
            report.stopped_by = "non-finite loss"
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        report.steps += 1
        if progress:
            progress(report.steps, config.max_steps, float(loss.detach()))
        if report.steps % config.check_every == 0:
            state = check(report.steps, state["exposed"])
    if report.passed:
        report.stopped_by = "passed"
    report.wall_time_s = time.perf_counter() - started
    logger.info("remediation %s after %d steps (%.1fs, stopped by %s)", "passed" if report.passed else "failed",
                report.steps, report.wall_time_s, report.stopped_by)
    return report


def _check(model, tokenizer, edits, heldout, retained, retained_bound, verify_config, report, step, config,
           exposed: frozenset = frozenset(), trained_subjects: set[str] | None = None) -> dict:
    """Run the membership test and the retained bound; log a history row; return the new gates:
    ``gate`` (the held-out NLL level) and ``exposed`` (ids whose secret span is still too exposed).

    The NLL-only test runs first; the full one (secret exposures) once that and the bound hold, and
    while some span is being forgotten (to close its gate).
    """
    result = verify(model, tokenizer, edits, heldout, replace(verify_config, secrets=False), retained=retained,
                    trained_subjects=trained_subjects)
    retained_nll = float(per_record_losses(model, retained, tokenizer).mean()) if retained else 0.0
    within = retained_nll <= retained_bound
    if verify_config.secrets and ((result.passed and within) or exposed):
        result = verify(model, tokenizer, edits, heldout, verify_config, retained=retained,
                        trained_subjects=trained_subjects)
        threshold = result.exposure_threshold if result.exposure_threshold is not None else math.inf
        exposed = frozenset(i for i, e in zip(result.erased.ids, result.erased.exposure)
                            if e is not None and e > threshold)
    report.verification = result
    report.passed = result.passed and within
    report.history.append({
        "step": step, "passed": result.passed, "retained_nll": retained_nll, "retained_within": within,
        "erased_nll_mean": float(np.mean(result.erased.nll)) if result.erased.nll else None,
        "heldout_score_median": float(np.median(result.heldout.score)) if result.heldout.score else None,
        "group_p": result.group_p, "exposure_max": result.exposure_max, "preference": result.preference,
        "new_score_median": result.new_score_median, "forgetting_spans": len(exposed),
    })
    gate = float(np.quantile(result.heldout.score, config.gate_quantile)) if result.heldout.score else math.inf
    return {"gate": gate, "exposed": exposed}
