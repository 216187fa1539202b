"""Solvers for the damped influence system ``(H + lambda I) x = b`` (docs/method.md#the-influence-estimate).
One module over 400 lines because every solver shares the monitor, the report and the stopping rule below.

Each solver takes the damped operator as callables, so it is independent of how HVPs are made
(one process, or summed across Ray Train workers):
- ``apply_eval(v)``: ``(H + lambda I) v`` on a fixed evaluation batch (deterministic);
- ``apply_minibatch(step, v)``: the same on the minibatch drawn for ``step`` (stochastic solvers).
Every solver stops when the relative residual ``||(H + lambda I) x - b|| / ||b||``, measured with
``apply_eval``, falls below ``tol``; raises :class:`SolverDivergedError` on non-finite values or a
residual that keeps growing; and raises :class:`SolverNotConvergedError` (carrying the report) when
the iteration cap is reached above ``tol`` unless ``require_converged=False``.

``eigen`` amortises the curvature: a :class:`LowRankCurvature` (top eigenpairs, built once per adapter
version by :func:`eigen_from_factor` or :func:`subspace_iteration`) gives the Woodbury-style inverse
``U (L + lambda)^-1 U^T b + (b - U U^T b) / lambda`` as the starting point and the preconditioner of
conjugate gradients on ``apply_eval`` (:func:`lowrank_conjugate_gradient`); the residual it reports is
the true one on the evaluation batch, like every other solver's.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from eraser.devices import accumulation_dtype, seeded_generator
from eraser.errors import SolverDivergedError, SolverNotConvergedError

ApplyEval = Callable[[torch.Tensor], torch.Tensor]
ApplyMinibatch = Callable[[int, torch.Tensor], torch.Tensor]

SOLVERS: tuple[str, ...] = ("cg", "sgd", "lissa", "eigen")
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
    if monitor.record(float(r.norm()) / max(monitor.b_norm, 1e-300)):
        return x, _finish(monitor, require_converged)
    return _preconditioned_cg(apply_eval, b, x, r, lambda v: v, monitor, max_iters, require_converged, progress)


def _preconditioned_cg(
    apply_eval: ApplyEval,
    b: torch.Tensor,
    x: torch.Tensor,
    r: torch.Tensor,
    precondition: Callable[[torch.Tensor], torch.Tensor],
    monitor: "_Monitor",
    max_iters: int,
    require_converged: bool,
    progress: Callable[[int, float], None] | None,
) -> tuple[torch.Tensor, SolverReport]:
    """Preconditioned conjugate gradients from ``x`` with residual ``r = b - A x`` (plain CG: the identity
    preconditioner). The operator must be positive definite along the search directions; a non-positive
    curvature ``p^T A p <= 0`` (the exact Hessian with too little damping) is reported as divergence."""
    z = precondition(r)
    p = z.clone()
    rz = float(r @ z)
    for _ in range(max_iters):
        ap = apply_eval(p)
        monitor.report.hvps += 1
        monitor.check_finite(ap, "HVP")
        curvature = float(p @ ap)
        if curvature <= 0:
            monitor.finish()
            raise SolverDivergedError(
                f"{monitor.report.solver}: non-positive curvature p^T A p = {curvature:.3g} at iteration "
                f"{monitor.report.iterations}: the damped matrix is indefinite (raise --damping or use --curvature ggn)"
            )
        alpha = rz / curvature
        x = x + alpha * p
        r = r - alpha * ap
        monitor.report.iterations += 1
        converged = monitor.record(float(r.norm()) / max(monitor.b_norm, 1e-300))
        if progress:
            progress(monitor.report.iterations, monitor.report.relative_residual)
        if converged:
            break
        z = precondition(r)
        rz_next = float(r @ z)
        p = z + (rz_next / rz) * p
        rz = rz_next
    # The recursive residual drifts in floating point: report the true one.
    monitor.report.relative_residual = _relative_residual(apply_eval, x, b, monitor)
    monitor.report.converged = monitor.report.relative_residual <= monitor.report.tol * 1.5
    return x, _finish(monitor, require_converged)


def _stochastic_check(monitor: _Monitor, step: int, max_iters: int, check_every: int,
                      measure: Callable[[], float], progress: Callable[[int, float], None] | None) -> bool:
    """The bookkeeping after step ``step`` (0-based) of a stochastic solver: count it; every ``check_every``
    steps and at the last, record the true residual (``measure()``, one evaluation-batch HVP) and report
    progress. True once converged."""
    monitor.report.iterations = step + 1
    if (step + 1) % check_every and step + 1 != max_iters:
        return False
    converged = monitor.record(measure())
    if progress:
        progress(step + 1, monitor.report.relative_residual)
    return converged


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
        if _stochastic_check(monitor, step, max_iters, check_every, lambda: _relative_residual(apply_eval, x, b, monitor),
                             progress):
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
        if _stochastic_check(monitor, step, max_iters, check_every,
                             lambda: _relative_residual(apply_eval, h / scale, b, monitor), progress):
            break
    return h / scale, _finish(monitor, require_converged)


def power_iteration(apply: ApplyEval, dim: int, iters: int = 20, seed: int = 0, dtype=torch.float32,
                    device=None) -> float:
    """Largest eigenvalue of a symmetric PSD operator (used to scale damping and step sizes). The start
    vector is drawn on the CPU from ``seed`` and moved to ``device``: the same on every device."""
    v = torch.randn(dim, generator=seeded_generator(seed), dtype=dtype, device="cpu").to(device or "cpu")
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


# -- amortised curvature: a cached low-rank eigendecomposition ---------------------------------
@dataclass
class LowRankCurvature:
    """``C ~= U diag(L) U^T``: the top eigenpairs of a PSD curvature, orthonormal ``U`` (p, k), ``L`` (k,)
    descending. Built once per adapter version; every request on that version reuses it."""

    vectors: torch.Tensor  # (p, k), orthonormal columns
    values: torch.Tensor  # (k,), descending, >= 0
    info: dict = field(default_factory=dict)  # how it was built: samples, passes, seconds

    @property
    def rank(self) -> int:
        return int(self.values.numel())

    @property
    def top(self) -> float:
        return float(self.values[0]) if self.rank else 0.0

    def to(self, device) -> "LowRankCurvature":
        """The curvature on ``device`` (itself when it is there already)."""
        device = torch.device(device)
        if self.vectors.device == device:
            return self
        return LowRankCurvature(vectors=self.vectors.to(device), values=self.values.to(device), info=self.info)

    def cpu(self) -> "LowRankCurvature":
        return self.to("cpu")

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """``U L U^T v`` (p,), on ``v``'s device and in its dtype."""
        u = self.vectors
        w = v.to(device=u.device, dtype=u.dtype)
        return (u @ (self.values * (u.T @ w))).to(device=v.device, dtype=v.dtype)

    def inverse(self, v: torch.Tensor, damping: float, tail: float = 0.0) -> torch.Tensor:
        """``(U L U^T + tail (I - U U^T) + lambda I)^-1 v = U (L + lambda)^-1 U^T v + (v - U U^T v) / (lambda + tail)``
        (Woodbury). ``tail = 0``: the low-rank curvature itself; ``tail = L[-1]``: the randomized Nystrom
        preconditioner of Frangella, Tropp & Udell (2023, SIAM J. Matrix Anal. Appl. 44(2), Eq. 5.2). (p,)"""
        if not damping > 0:
            raise ValueError(f"damping must be > 0 for the low-rank inverse, got {damping!r}")
        u = self.vectors
        w = v.to(device=u.device, dtype=u.dtype)
        coefficients = u.T @ w  # (k,)
        inside = u @ (coefficients / (self.values + damping))  # (p,)
        outside = (w - u @ coefficients) / (damping + tail)
        return (inside + outside).to(device=v.device, dtype=v.dtype)


def eigen_from_factor(factor: torch.Tensor, rank: int, count: int | None = None) -> LowRankCurvature:
    """Top ``rank`` eigenpairs of ``C = F^T F / count`` from a factor ``F`` (m, p), through the m x m Gram
    matrix: ``F F^T / count = W M W^T`` gives ``U = F^T W M^-1/2 / sqrt(count)``.

    The Gram matrix is formed in the factor's accumulation dtype (float32, also for a factor made in half
    precision: a third of float64's time, which dominated the cache build) on its device, and decomposed in
    float64. Eigenvalues below ``10 eps`` (of the Gram's dtype) of the top one are dropped: their Gram error
    is as large as they are, so ``M^-1/2`` would blow that error up in ``U``; any damping a solve uses is
    far larger, so those directions are treated as the tail either way. (The eps is the Gram's, not the
    model's: bfloat16's would be 10 x 2^-7 and drop most eigenpairs of a bfloat16 model.)"""
    count = count or factor.shape[0]
    factor = factor.to(accumulation_dtype(factor.dtype))
    gram = (factor @ factor.T).to(torch.float64) / count  # (m, m)
    values, vectors = torch.linalg.eigh(gram)  # ascending
    floor = max(1e-10, 10 * torch.finfo(factor.dtype).eps) * values[-1]
    keep = min(rank, int((values > floor).sum()))
    values, vectors = values.flip(0)[:keep], vectors.flip(1)[:, :keep]  # (k,), (m, k)
    u = factor.T @ (vectors / torch.sqrt(values * count)).to(factor.dtype)  # (p, k)
    return LowRankCurvature(vectors=u, values=values.to(factor.dtype))


def subspace_iteration(
    apply: ApplyEval,
    dim: int,
    rank: int,
    *,
    oversample: int = 10,
    iters: int = 2,
    seed: int = 0,
    dtype=torch.float32,
    device=None,
) -> LowRankCurvature:
    """Top ``rank`` eigenpairs of a symmetric PSD operator by randomized subspace iteration with a final
    Rayleigh-Ritz step (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.3). Costs
    ``(iters + 1) * (rank + oversample)`` operator applications. The start block is drawn on the CPU and
    moved to ``device``; ``dtype`` is raised to float32 for a half-precision one."""
    width = min(dim, rank + oversample)
    dtype = accumulation_dtype(dtype)
    start = torch.randn(dim, width, generator=seeded_generator(seed), dtype=dtype, device="cpu").to(device or "cpu")
    q, _ = torch.linalg.qr(start)  # (p, w)

    def apply_block(block: torch.Tensor) -> torch.Tensor:
        return torch.stack([apply(block[:, j]) for j in range(block.shape[1])], dim=1)

    for _ in range(iters):
        q, _ = torch.linalg.qr(apply_block(q))
    projected = q.T @ apply_block(q)  # (w, w)
    values, vectors = torch.linalg.eigh((projected + projected.T) / 2)
    values, vectors = values.flip(0)[:rank], vectors.flip(1)[:, :rank]
    return LowRankCurvature(vectors=q @ vectors, values=values.clamp(min=0),
                            info={"operator_applications": (iters + 1) * width})


def lowrank_conjugate_gradient(
    apply_eval: ApplyEval,
    b: torch.Tensor,
    curvature: LowRankCurvature,
    *,
    tol: float = 5e-2,
    max_iters: int = 20,
    damping: float,
    require_converged: bool = True,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[torch.Tensor, SolverReport]:
    """The cached low-rank curvature's solution, refined on ``apply_eval`` by preconditioned CG.

    1. ``x_0 = (U L U^T + lambda I)^-1 b`` (docs/method.md#the-cached-curvature-and-the-woodbury-solve): exact for the low-rank
       curvature, the complement of its eigenvectors treated as curvature-free (step ``1 / lambda``).
       Its residual on the evaluation batch is measured (one operator application) and reported: it
       says how far the low-rank curvature is from the evaluation batch's, not a solver tolerance.
    2. While that residual is above ``tol`` and ``max_iters > 0``: conjugate gradients on ``apply_eval``
       with the randomized Nystrom preconditioner (``inverse(., lambda, tail=L[-1])``), from ``x_0`` or
       from 0, whichever has the smaller residual. ``max_iters=0`` keeps the low-rank solution.
    ``iterations`` counts CG steps after ``x_0``; ``relative_residual`` is the true one on the batch.
    """
    monitor = _Monitor("eigen", b, tol, damping)
    tail = float(curvature.values[-1]) if curvature.rank else 0.0
    monitor.report.extra.update(rank=curvature.rank, cached_top_eigenvalue=curvature.top, nystrom_tail=tail)
    x = curvature.inverse(b, damping)
    monitor.check_finite(x, "low-rank solution")
    r = b - apply_eval(x)
    monitor.report.hvps += 1
    monitor.check_finite(r, "HVP")
    initial = float(r.norm()) / max(monitor.b_norm, 1e-300)
    monitor.report.extra.update(lowrank_relative_residual=initial, lowrank_step_norm=float(x.norm()))
    if progress:
        progress(0, initial)
    if max_iters == 0:  # exact for the cached curvature; the batch residual says how far that is from it,
        monitor.record(initial)  # and is reported, not a stopping rule
        monitor.report.extra["lowrank_exact"] = True
        return x, _finish(monitor, False)
    if monitor.record(initial):
        return x, _finish(monitor, require_converged)
    if initial > 1.0:  # the zero vector is closer (residual 1): start there
        x, r = torch.zeros_like(b), b.clone()
        monitor.report.extra["restarted_from_zero"] = True
    return _preconditioned_cg(apply_eval, b, x, r, lambda v: curvature.inverse(v, damping, tail), monitor,
                              max_iters, require_converged, progress)
