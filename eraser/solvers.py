"""Solvers for the damped influence system ``(H + lambda I) x = b`` (DESIGN.md, "The method").

Each solver takes the damped operator as callables, so it is independent of how HVPs are made
(one process, or summed across Ray Train workers):
- ``apply_eval(v)``: ``(H + lambda I) v`` on a fixed evaluation batch (deterministic);
- ``apply_minibatch(step, v)``: the same on the minibatch drawn for ``step`` (stochastic solvers).
Every solver stops when the relative residual ``||(H + lambda I) x - b|| / ||b||``, measured with
``apply_eval``, falls below ``tol``; raises :class:`SolverDivergedError` on non-finite values or a
residual that keeps growing; and raises :class:`SolverNotConvergedError` (carrying the report) when
the iteration cap is reached above ``tol`` unless ``require_converged=False``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from eraser.errors import SolverDivergedError, SolverNotConvergedError

ApplyEval = Callable[[torch.Tensor], torch.Tensor]
ApplyMinibatch = Callable[[int, torch.Tensor], torch.Tensor]

SOLVERS: tuple[str, ...] = ("cg", "sgd", "lissa")
# A residual this many times above the best one seen (and above ||b||) means the iteration diverges.
DIVERGENCE_FACTOR = 1e3


@dataclass
class SolverReport:
    """What a solve did: enough to judge it and to reproduce it."""

    solver: str
    iterations: int = 0
    relative_residual: float = math.inf
    converged: bool = False
    tol: float = 0.0
    damping: float = 0.0
    wall_time_s: float = 0.0
    hvps: int = 0  # operator applications (each is one HVP over a batch)
    residual_history: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class _Monitor:
    """Tracks the residual, detects divergence, and counts operator applications."""

    def __init__(self, solver: str, b: torch.Tensor, tol: float, damping: float):
        self.report = SolverReport(solver=solver, tol=tol, damping=damping)
        self.b_norm = float(b.norm())
        self.best = math.inf
        self.started = time.perf_counter()

    def check_finite(self, x: torch.Tensor, what: str) -> None:
        if not torch.isfinite(x).all():
            self.finish()
            raise SolverDivergedError(
                f"{self.report.solver}: non-finite {what} at iteration {self.report.iterations} "
                f"(raise --damping or use --curvature ggn)"
            )

    def record(self, relative_residual: float) -> bool:
        """Log a residual; True when converged. Raises when it diverges."""
        self.report.residual_history.append(relative_residual)
        self.report.relative_residual = relative_residual
        if not math.isfinite(relative_residual) or (
            relative_residual > 1.0 and relative_residual > DIVERGENCE_FACTOR * self.best
        ):
            self.finish()
            raise SolverDivergedError(
                f"{self.report.solver}: residual grew to {relative_residual:.3g} at iteration "
                f"{self.report.iterations} (best {self.best:.3g}); raise --damping, lower the step, or use --curvature ggn"
            )
        self.best = min(self.best, relative_residual)
        self.report.converged = relative_residual <= self.report.tol
        return self.report.converged

    def finish(self) -> SolverReport:
        self.report.wall_time_s = time.perf_counter() - self.started
        return self.report


def _finish(monitor: _Monitor, require_converged: bool) -> SolverReport:
    report = monitor.finish()
    if require_converged and not report.converged:
        raise _not_converged(report)
    return report


def _not_converged(report: SolverReport) -> SolverNotConvergedError:
    error = SolverNotConvergedError(
        f"{report.solver}: relative residual {report.relative_residual:.3g} above tol {report.tol:g} "
        f"after {report.iterations} iterations (raise --max-iters or --damping)"
    )
    error.report = report  # type: ignore[attr-defined]
    return error


def _relative_residual(apply_eval: ApplyEval, x: torch.Tensor, b: torch.Tensor, monitor: _Monitor) -> float:
    monitor.report.hvps += 1
    return float((apply_eval(x) - b).norm()) / max(monitor.b_norm, 1e-300)


def conjugate_gradient(
    apply_eval: ApplyEval,
    b: torch.Tensor,
    *,
    tol: float = 1e-4,
    max_iters: int = 100,
    damping: float = 0.0,
    require_converged: bool = True,
    x0: torch.Tensor | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[torch.Tensor, SolverReport]:
    """Conjugate gradients (Hestenes-Stiefel) on the fixed batch of ``apply_eval``.

    The operator must be positive definite along the search directions; a non-positive curvature
    ``p^T A p <= 0`` (the exact Hessian with too little damping) is reported as divergence.
    """
    monitor = _Monitor("cg", b, tol, damping)
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - apply_eval(x) if x0 is not None else b.clone()
    p = r.clone()
    rs = float(r @ r)
    if monitor.record(math.sqrt(rs) / max(monitor.b_norm, 1e-300)):
        return x, _finish(monitor, require_converged)
    for _ in range(max_iters):
        ap = apply_eval(p)
        monitor.report.hvps += 1
        monitor.check_finite(ap, "HVP")
        curvature = float(p @ ap)
        if curvature <= 0:
            monitor.finish()
            raise SolverDivergedError(
                f"cg: non-positive curvature p^T A p = {curvature:.3g} at iteration {monitor.report.iterations}: "
                "the damped matrix is indefinite (raise --damping or use --curvature ggn)"
            )
        alpha = rs / curvature
        x = x + alpha * p
        r = r - alpha * ap
        rs_next = float(r @ r)
        monitor.report.iterations += 1
        converged = monitor.record(math.sqrt(rs_next) / max(monitor.b_norm, 1e-300))
        if progress:
            progress(monitor.report.iterations, monitor.report.relative_residual)
        if converged:
            break
        p = r + (rs_next / rs) * p
        rs = rs_next
    # CG's recursive residual drifts in floating point: report the true one.
    monitor.report.relative_residual = _relative_residual(apply_eval, x, b, monitor)
    monitor.report.converged = monitor.report.relative_residual <= tol * 1.5
    return x, _finish(monitor, require_converged)


def stochastic_gradient(
    apply_minibatch: ApplyMinibatch,
    apply_eval: ApplyEval,
    b: torch.Tensor,
    *,
    lr: float,
    tol: float = 1e-2,
    max_iters: int = 1000,
    momentum: float = 0.0,
    check_every: int = 10,
    damping: float = 0.0,
    require_converged: bool = True,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[torch.Tensor, SolverReport]:
    """LLMEraser's solver (ICLR 2025, Sec. 4): minibatch gradient steps on the finite-sum quadratic
    ``q(x) = 1/2 x^T (H + lambda I) x - b^T x``, whose gradient on minibatch ``B_k`` is
    ``(H_{B_k} + lambda I) x - b``; the HVP is taken on a fresh minibatch each step.
    ``lr`` must be below ``2 / lambda_max``; ``1 / lambda_max`` is the usual choice."""
    monitor = _Monitor("sgd", b, tol, damping)
    monitor.report.extra.update(lr=lr, momentum=momentum)
    x = torch.zeros_like(b)
    velocity = torch.zeros_like(b)
    for step in range(max_iters):
        grad = apply_minibatch(step, x) - b
        monitor.report.hvps += 1
        monitor.check_finite(grad, "gradient")
        velocity = momentum * velocity + grad
        x = x - lr * velocity
        monitor.report.iterations = step + 1
        if (step + 1) % check_every == 0 or step + 1 == max_iters:
            converged = monitor.record(_relative_residual(apply_eval, x, b, monitor))
            if progress:
                progress(step + 1, monitor.report.relative_residual)
            if converged:
                break
    return x, _finish(monitor, require_converged)


def lissa(
    apply_minibatch: ApplyMinibatch,
    apply_eval: ApplyEval,
    b: torch.Tensor,
    *,
    scale: float,
    tol: float = 1e-2,
    max_iters: int = 1000,
    check_every: int = 10,
    damping: float = 0.0,
    require_converged: bool = True,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[torch.Tensor, SolverReport]:
    """LiSSA (Agarwal et al., 2017): the Neumann recursion ``h_j = b + (I - A_{B_j} / s) h_{j-1}``,
    ``h_0 = b``, with ``A^{-1} b ~= h_J / s``; ``s`` must exceed ``lambda_max`` of ``A``."""
    monitor = _Monitor("lissa", b, tol, damping)
    monitor.report.extra.update(scale=scale)
    h = b.clone()
    for step in range(max_iters):
        h = b + h - apply_minibatch(step, h) / scale
        monitor.report.hvps += 1
        monitor.check_finite(h, "iterate")
        monitor.report.iterations = step + 1
        if (step + 1) % check_every == 0 or step + 1 == max_iters:
            converged = monitor.record(_relative_residual(apply_eval, h / scale, b, monitor))
            if progress:
                progress(step + 1, monitor.report.relative_residual)
            if converged:
                break
    return h / scale, _finish(monitor, require_converged)


def power_iteration(apply: ApplyEval, dim: int, iters: int = 20, seed: int = 0, dtype=torch.float32) -> float:
    """Largest eigenvalue of a symmetric PSD operator (used to scale damping and step sizes)."""
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(dim, generator=generator, dtype=dtype)
    v = v / v.norm()
    eigenvalue = 0.0
    for _ in range(iters):
        w = apply(v)
        eigenvalue = float(v @ w)
        norm = w.norm()
        if not torch.isfinite(norm) or norm == 0:
            break
        v = w / norm
    return abs(eigenvalue)
