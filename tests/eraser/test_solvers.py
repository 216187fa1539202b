"""Every solver against torch.linalg.solve on an explicit damped matrix, and its failure modes."""

from __future__ import annotations

import pytest
import torch

from eraser import solvers
from eraser.curvature import lora_parameters
from eraser.errors import SolverDivergedError, SolverNotConvergedError
from eraser.influence import InfluenceSystem, SolveConfig
from eraser.records import collate

from tests.eraser.test_curvature import explicit_hessian
from tests.tolerances import CG, STOCHASTIC, assert_close


def spd_matrix(dim: int = 40, condition: float = 50.0, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    eigenvalues = torch.logspace(0, torch.log10(torch.tensor(condition)).item(), dim, dtype=torch.float64)
    return q @ torch.diag(eigenvalues) @ q.T


@pytest.fixture()
def system():
    matrix = spd_matrix()
    b = torch.randn(matrix.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return matrix, b, torch.linalg.solve(matrix, b)


def test_cg_matches_linalg_solve(system):
    matrix, b, exact = system
    x, report = solvers.conjugate_gradient(lambda v: matrix @ v, b, tol=1e-8, max_iters=200)
    assert_close(x, exact, CG)
    assert report.converged and report.relative_residual <= 1e-7 and report.hvps >= report.iterations


def test_sgd_matches_linalg_solve(system):
    matrix, b, exact = system
    lam_max = float(torch.linalg.eigvalsh(matrix).max())
    x, report = solvers.stochastic_gradient(lambda step, v: matrix @ v, lambda v: matrix @ v, b,
                                            lr=1.0 / lam_max, tol=1e-4, max_iters=5000, momentum=0.5)
    assert_close(x, exact, STOCHASTIC)
    assert report.converged


def test_lissa_matches_linalg_solve(system):
    matrix, b, exact = system
    lam_max = float(torch.linalg.eigvalsh(matrix).max())
    x, report = solvers.lissa(lambda step, v: matrix @ v, lambda v: matrix @ v, b, scale=1.2 * lam_max,
                              tol=1e-4, max_iters=5000)
    assert_close(x, exact, STOCHASTIC)
    assert report.converged


def test_power_iteration_finds_top_eigenvalue(system):
    matrix, _, _ = system
    top = solvers.power_iteration(lambda v: matrix @ v, matrix.shape[0], iters=200, dtype=torch.float64)
    assert_close(top, torch.linalg.eigvalsh(matrix).max(), 1e-3)


def test_cg_on_indefinite_matrix_raises_diverged():
    matrix = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    with pytest.raises(SolverDivergedError, match="non-positive curvature"):
        solvers.conjugate_gradient(lambda v: matrix @ v, torch.ones(3, dtype=torch.float64), tol=1e-10)


def test_sgd_with_too_large_step_raises_diverged(system):
    matrix, b, _ = system
    with pytest.raises(SolverDivergedError):
        solvers.stochastic_gradient(lambda s, v: matrix @ v, lambda v: matrix @ v, b, lr=1.0, max_iters=500)


def test_non_finite_operator_raises_diverged(system):
    _, b, _ = system
    with pytest.raises(SolverDivergedError, match="non-finite"):
        solvers.conjugate_gradient(lambda v: v * float("nan"), b)


def test_iteration_cap_raises_not_converged_with_report(system):
    matrix, b, _ = system
    with pytest.raises(SolverNotConvergedError) as caught:
        solvers.conjugate_gradient(lambda v: matrix @ v, b, tol=1e-12, max_iters=3)
    assert caught.value.report.iterations == 3
    _, report = solvers.conjugate_gradient(lambda v: matrix @ v, b, tol=1e-12, max_iters=3, require_converged=False)
    assert not report.converged


@pytest.mark.parametrize("solver", ["cg", "sgd", "lissa"])
def test_influence_system_solves_the_damped_lora_system(tiny_model, records, tokenizer, solver):
    """Full-batch operator of a real LoRA model vs the explicit (Hessian + lambda I) solve, float64."""
    subset = records[:6]
    config = SolveConfig(solver=solver, curvature="hessian", damping=1.0, damping_mode="absolute",
                         tol=1e-7 if solver == "cg" else 1e-4, max_iters=3000, batch_size=len(subset),
                         eval_size=len(subset), micro_batch=len(subset), check_every=50)
    system = InfluenceSystem(tiny_model, tokenizer, subset, config)
    params = lora_parameters(tiny_model)
    hessian = explicit_hessian(tiny_model, params, collate(subset, tokenizer)) / len(subset)
    damped = hessian + torch.eye(hessian.shape[0], dtype=torch.float64)
    # The model and its damping are fixed, so this holds always or never: a precondition, not a skip.
    assert torch.linalg.eigvalsh(damped).min() > 0, "damping=1.0 no longer makes the system positive definite"
    b = torch.randn(hessian.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x, report = system.solve(b)
    assert_close(x, torch.linalg.solve(damped, b), CG if solver == "cg" else STOCHASTIC)
    assert report.extra["curvature"] == "hessian"
