"""The influence system of one adapter version: ``b`` for a set of edits and the damped solve.

:class:`InfluenceSystem` is the one place that holds state (model, records, cached top eigenvalue).
Records may be sharded over workers: a worker computes only the records whose global index
``i % world_size == rank`` and ``Shard.reduce`` sums tensors across workers (an all-reduce in
``cluster``; the identity in one process). Minibatches are drawn over *global* indices from the
seed, so N workers compute exactly the sums one process would (up to floating-point order).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal, Sequence

import torch

from eraser.curvature import CURVATURES, gradient_sum, hvp_sum, lora_parameters, num_parameters
from eraser.errors import EraserError
from eraser.records import Record, collate
from eraser.requests import Edit
from eraser import solvers

logger = logging.getLogger(__name__)

DEFAULT_TOL = {"cg": 1e-3, "sgd": 5e-2, "lissa": 5e-2}


@dataclass(frozen=True)
class SolveConfig:
    """How to solve ``(C + lambda I) x = b``. Defaults chosen by measurement (see README, benchmarks)."""

    solver: str = "cg"  # cg | sgd | lissa
    curvature: str = "ggn"  # ggn (PSD, stable) | hessian (exact, indefinite)
    damping: float = 0.01  # lambda; relative to the top curvature eigenvalue unless damping_mode="absolute"
    damping_mode: Literal["relative", "absolute"] = "relative"
    tol: float | None = None  # relative residual target; None = the solver's default (DEFAULT_TOL)
    max_iters: int = 200
    batch_size: int = 32  # records per stochastic HVP (sgd, lissa)
    eval_size: int = 256  # records in the fixed batch for residuals (and cg's operator)
    micro_batch: int = 16  # records per forward/backward, bounds memory
    lr_scale: float = 1.0  # sgd step = lr_scale / lambda_max(C + lambda I)
    momentum: float = 0.0  # sgd heavy-ball momentum
    power_iters: int = 20  # iterations to estimate the top eigenvalue
    check_every: int = 10  # stochastic solvers: residual check period
    seed: int = 0
    require_converged: bool = True

    def __post_init__(self) -> None:
        if self.solver not in solvers.SOLVERS:
            raise EraserError(f"solver must be one of {solvers.SOLVERS}, got {self.solver!r}")
        if self.curvature not in CURVATURES:
            raise EraserError(f"curvature must be one of {CURVATURES}, got {self.curvature!r}")
        if not (self.damping > 0 and math.isfinite(self.damping)):
            raise EraserError(f"damping must be a positive number, got {self.damping!r}")
        if self.damping_mode not in ("relative", "absolute"):
            raise EraserError(f"damping_mode must be 'relative' or 'absolute', got {self.damping_mode!r}")
        for name in ("max_iters", "batch_size", "eval_size", "micro_batch", "power_iters", "check_every"):
            if getattr(self, name) < 1:
                raise EraserError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.tol is not None and not (0 < self.tol < 1):
            raise EraserError(f"tol must be in (0, 1), got {self.tol!r}")

    @property
    def resolved_tol(self) -> float:
        return self.tol if self.tol is not None else DEFAULT_TOL[self.solver]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Shard:
    """This process's part of the records and how to sum a tensor across all parts."""

    rank: int = 0
    world_size: int = 1
    reduce: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda t: t)

    def owns(self, index: int) -> bool:
        return index % self.world_size == self.rank


class InfluenceSystem:
    """Gradients and the damped curvature operator of ``L(theta) = (1/n) sum_i l(z_i)`` at one adapter."""

    def __init__(self, model, tokenizer, records: Sequence[Record], config: SolveConfig, shard: Shard | None = None):
        if not records:
            raise EraserError("no training records: the curvature needs the adapter's training set")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.records = list(records)
        self.config = config
        self.shard = shard or Shard()
        self.params = lora_parameters(model)
        self.dim = num_parameters(self.params)
        self.dtype = self.params[0].dtype
        self.record_passes = 0  # records pushed through an HVP or gradient by this worker
        self._top_eigenvalue: float | None = None
        rng = random.Random(config.seed)
        n = len(self.records)
        self.eval_indices = sorted(rng.sample(range(n), min(config.eval_size, n)))

    # -- sums over (global) record indices, computed on this shard, reduced across shards ---------
    def _local_micro_batches(self, records_with_index: Sequence[tuple[int, Record]]):
        mine = [record for index, record in records_with_index if self.shard.owns(index)]
        step = self.config.micro_batch
        for start in range(0, len(mine), step):
            chunk = mine[start : start + step]
            self.record_passes += len(chunk)
            yield collate(chunk, self.tokenizer)

    def curvature_mean(self, indices: Sequence[int], vector: torch.Tensor) -> torch.Tensor:
        """``(1/|I|) sum_{i in I} C_i v`` (undamped), I global record indices."""
        total = torch.zeros(self.dim, dtype=self.dtype)
        for batch in self._local_micro_batches([(i, self.records[i]) for i in indices]):
            total += hvp_sum(self.model, self.params, batch, vector, self.config.curvature)
        return self.shard.reduce(total) / len(indices)

    def gradient_of_edits(self, edits: Sequence[Edit]) -> torch.Tensor:
        """``b = (1/n) sum_{i in S} [grad l(z_i) - grad l(z'_i)]`` (DESIGN.md, "The method")."""
        if not edits:
            raise EraserError("no edits: nothing to erase")
        old = [(j, edit.old) for j, edit in enumerate(edits)]
        new = [(j, edit.new) for j, edit in enumerate(edits) if edit.new is not None]
        total = torch.zeros(self.dim, dtype=self.dtype)
        for batch in self._local_micro_batches(old):
            total += gradient_sum(self.model, self.params, batch)
        for batch in self._local_micro_batches(new):
            total -= gradient_sum(self.model, self.params, batch)
        return self.shard.reduce(total) / len(self.records)

    # -- the damped operator ------------------------------------------------------------------
    def minibatch_indices(self, step: int) -> list[int]:
        n = len(self.records)
        rng = random.Random(self.config.seed * 1_000_003 + step + 1)
        return sorted(rng.sample(range(n), min(self.config.batch_size, n)))

    def top_eigenvalue(self) -> float:
        """Largest eigenvalue of the (undamped) curvature on the evaluation batch; cached per adapter."""
        if self._top_eigenvalue is None:
            apply = lambda v: self.curvature_mean(self.eval_indices, v)  # noqa: E731
            self._top_eigenvalue = solvers.power_iteration(
                apply, self.dim, iters=self.config.power_iters, seed=self.config.seed, dtype=self.dtype
            )
            logger.info("top %s eigenvalue %.4g (power iteration, %d records)", self.config.curvature,
                        self._top_eigenvalue, len(self.eval_indices))
        return self._top_eigenvalue

    def damping(self) -> float:
        if self.config.damping_mode == "absolute":
            return self.config.damping
        return self.config.damping * max(self.top_eigenvalue(), 1e-12)

    def solve(self, b: torch.Tensor, progress: Callable[[int, float], None] | None = None):
        """``x ~= (C + lambda I)^-1 b`` with the configured solver; returns ``(x, SolverReport)``."""
        cfg = self.config
        lam = self.damping()
        apply_eval = lambda v: self.curvature_mean(self.eval_indices, v) + lam * v  # noqa: E731
        apply_minibatch = lambda step, v: self.curvature_mean(self.minibatch_indices(step), v) + lam * v  # noqa: E731
        common = dict(tol=cfg.resolved_tol, max_iters=cfg.max_iters, damping=lam,
                      require_converged=cfg.require_converged, progress=progress)
        if cfg.solver == "cg":
            x, report = solvers.conjugate_gradient(apply_eval, b, **common)
        else:
            # Step sizes need lambda_max of the damped operator; power iteration sees the eval batch,
            # minibatches can exceed it, so keep a safety margin.
            lam_max = 1.5 * self.top_eigenvalue() + lam
            if cfg.solver == "sgd":
                x, report = solvers.stochastic_gradient(
                    apply_minibatch, apply_eval, b, lr=cfg.lr_scale / lam_max, momentum=cfg.momentum,
                    check_every=cfg.check_every, **common)
            else:
                x, report = solvers.lissa(apply_minibatch, apply_eval, b, scale=lam_max,
                                          check_every=cfg.check_every, **common)
        report.extra.update(curvature=cfg.curvature, damping_relative=cfg.damping if cfg.damping_mode == "relative" else None,
                            top_eigenvalue=self._top_eigenvalue, world_size=self.shard.world_size)
        return x, report
