"""The cached low-rank curvature (solver "eigen") against explicit float64 matrices."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from eraser import solvers
from eraser.curvature import gradient_sum, hvp_sum, lora_parameters, per_record_gradients, sampled_ggn_factor
from eraser.errors import StaleCurvatureError
from eraser.influence import InfluenceSystem, SolveConfig
from eraser.records import collate
from eraser.update import apply_step

from tests.eraser.test_solvers import spd_matrix
from tests.tolerances import CG, EXACT, assert_close


def explicit_operator(apply, dim: int) -> torch.Tensor:
    eye = torch.eye(dim, dtype=torch.float64)
    return torch.stack([apply(eye[:, j]) for j in range(dim)], dim=1)


def test_woodbury_inverse_is_exact_on_low_rank_plus_damping():
    generator = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(30, 6, generator=generator, dtype=torch.float64))
    values = torch.tensor([9.0, 5.0, 3.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    curvature = solvers.LowRankCurvature(vectors=u, values=values)
    matrix = u @ torch.diag(values) @ u.T
    b = torch.randn(30, generator=generator, dtype=torch.float64)
    assert_close(curvature.apply(b), matrix @ b, EXACT)
    eye = torch.eye(30, dtype=torch.float64)
    assert_close(curvature.inverse(b, 0.3), torch.linalg.solve(matrix + 0.3 * eye, b), EXACT)
    nystrom = matrix + 0.1 * (eye - u @ u.T)  # the complement at the smallest kept eigenvalue
    assert_close(curvature.inverse(b, 0.3, tail=0.1), torch.linalg.solve(nystrom + 0.3 * eye, b), EXACT)


def test_eigen_from_factor_matches_eigh_of_the_explicit_matrix():
    generator = torch.Generator().manual_seed(1)
    factor = torch.randn(12, 40, generator=generator, dtype=torch.float64) * torch.linspace(3, 0.1, 40, dtype=torch.float64)
    matrix = factor.T @ factor / 12
    curvature = solvers.eigen_from_factor(factor, rank=5)
    values, vectors = torch.linalg.eigh(matrix)
    assert_close(curvature.values, values.flip(0)[:5], EXACT)
    top = vectors.flip(1)[:, :5]
    assert_close(curvature.vectors @ curvature.vectors.T, top @ top.T, 1e-8)  # same invariant subspace
    assert_close(curvature.vectors.T @ curvature.vectors, torch.eye(5, dtype=torch.float64), EXACT)
    full = solvers.eigen_from_factor(factor, rank=40)  # rank is capped by the factor's 12 rows
    assert full.rank == 12
    assert_close(full.apply(factor[0]), matrix @ factor[0], 1e-8)


def test_eigen_from_factor_in_float32_drops_what_float32_cannot_resolve():
    """A float32 factor whose spectrum spans 12 decades: the kept directions stay orthonormal and the damped
    inverse matches the float64 one, because directions under float32's resolution go to the tail."""
    generator = torch.Generator().manual_seed(2)
    scales = torch.logspace(0, -6, 64, dtype=torch.float64)  # singular values: eigenvalues 1 .. 1e-12
    factor64 = torch.randn(64, 200, generator=generator, dtype=torch.float64)
    factor64 = torch.linalg.qr(factor64.T).Q.T * scales[:, None] * 8  # (64, 200), orthogonal rows
    exact = solvers.eigen_from_factor(factor64, rank=64)
    single = solvers.eigen_from_factor(factor64.to(torch.float32), rank=64)
    assert single.rank < exact.rank  # the tiny eigenvalues were dropped
    assert_close(single.vectors.T @ single.vectors, torch.eye(single.rank), 1e-4)
    b = torch.randn(200, generator=generator, dtype=torch.float64)
    damping = 1e-3 * exact.top
    assert_close(single.inverse(b.float(), damping).double(), exact.inverse(b, damping), 1e-4)


def test_subspace_iteration_finds_the_top_eigenpairs():
    matrix = spd_matrix(dim=40, condition=1e4)
    curvature = solvers.subspace_iteration(lambda v: matrix @ v, 40, rank=6, iters=3, dtype=torch.float64)
    assert_close(curvature.values, torch.linalg.eigvalsh(matrix).flip(0)[:6], 1e-6)
    full = solvers.subspace_iteration(lambda v: matrix @ v, 40, rank=40, iters=1, dtype=torch.float64)
    assert_close(full.vectors @ torch.diag(full.values) @ full.vectors.T, matrix, 1e-9)


def test_lowrank_cg_matches_linalg_solve_with_a_poor_or_an_exact_cache():
    matrix = spd_matrix(dim=40, condition=100.0)
    b = torch.randn(40, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    damping = 0.5
    damped = matrix + damping * torch.eye(40, dtype=torch.float64)
    exact = torch.linalg.solve(damped, b)
    poor = solvers.subspace_iteration(lambda v: matrix @ v, 40, rank=5, iters=2, dtype=torch.float64)
    x, report = solvers.lowrank_conjugate_gradient(lambda v: damped @ v, b, poor, damping=damping, tol=1e-9,
                                                   max_iters=100)
    assert_close(x, exact, CG)
    assert report.converged and report.iterations > 0 and report.extra["lowrank_relative_residual"] > 1e-3
    assert report.relative_residual <= 1.5e-9  # the true residual, measured once more at the end
    full = solvers.subspace_iteration(lambda v: matrix @ v, 40, rank=40, iters=1, dtype=torch.float64)
    x, report = solvers.lowrank_conjugate_gradient(lambda v: damped @ v, b, full, damping=damping, tol=1e-8)
    assert_close(x, exact, CG)
    assert report.iterations == 0 and report.hvps == 1  # the Woodbury solution already meets tol


def test_lowrank_cg_reports_not_converged_at_the_cap():
    matrix = spd_matrix(dim=40, condition=1e3)
    b = torch.ones(40, dtype=torch.float64)
    poor = solvers.subspace_iteration(lambda v: matrix @ v, 40, rank=2, iters=1, dtype=torch.float64)
    with pytest.raises(solvers.SolverNotConvergedError) as caught:
        solvers.lowrank_conjugate_gradient(lambda v: matrix @ v + 1e-3 * v, b, poor, damping=1e-3, tol=1e-12,
                                           max_iters=2)
    assert caught.value.report.iterations == 2


def test_per_record_gradients_match_autograd(tiny_model, records, tokenizer):
    params = lora_parameters(tiny_model)
    rows = per_record_gradients(tiny_model, params, collate(records[:4], tokenizer))
    for i in range(4):
        assert_close(rows[i], gradient_sum(tiny_model, params, collate(records[i : i + 1], tokenizer)), EXACT)


@pytest.fixture(scope="module")
def small_system(tokenizer, records):
    """A float64 LoRA model with 64 parameters, 4 records, and its explicit mean Gauss-Newton matrix."""
    from tests.eraser.conftest import tiny_lora_model

    model = tiny_lora_model(tokenizer, rank=1, hidden=16)
    params = lora_parameters(model)
    subset = records[:4]
    batch = collate(subset, tokenizer)
    dim = sum(p.numel() for p in params)
    ggn = explicit_operator(lambda v: hvp_sum(model, params, batch, v, "ggn"), dim) / len(subset)
    return model, subset, ggn


def test_sampled_factor_is_an_unbiased_gauss_newton_estimate(small_system, tokenizer):
    model, subset, ggn = small_system
    params = lora_parameters(model)
    copies = 400  # independent draws as copies of the records in one batch, each with its own seed
    rows = sampled_ggn_factor(model, params, collate(subset * copies, tokenizer), seeds=range(len(subset) * copies))
    estimate = rows.T @ rows / copies / len(subset)
    assert_close(estimate, ggn, 0.15)  # Monte Carlo: the error shrinks like 1/sqrt(copies)
    alone = sampled_ggn_factor(model, params, collate(subset[1:2], tokenizer), draws=2, seeds=[1])
    pair = sampled_ggn_factor(model, params, collate(subset[:2], tokenizer), draws=2, seeds=[0, 1])
    assert_close(alone, pair.view(2, 2, -1)[:, 1], EXACT)  # a record's rows do not depend on its batch


def test_influence_system_eigen_solver_matches_explicit_damped_ggn(small_system, tokenizer):
    model, subset, ggn = small_system
    dim = ggn.shape[0]
    damped = ggn + torch.eye(dim, dtype=torch.float64)
    b = torch.randn(dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    exact = torch.linalg.solve(damped, b)
    common = dict(solver="eigen", curvature="ggn", damping=1.0, damping_mode="absolute", eval_size=len(subset),
                  cache_samples=len(subset), micro_batch=len(subset), tol=1e-8, max_iters=dim)

    exact_cache = InfluenceSystem(model, tokenizer, subset, SolveConfig(**common, cache_method="hvp", rank=dim,
                                                                        cache_iters=0))
    x, report = exact_cache.solve(b)
    assert_close(x, exact, CG)
    assert report.iterations == 0 and report.extra["rank"] == dim  # the Woodbury solution is the answer

    sampled = InfluenceSystem(model, tokenizer, subset, SolveConfig(**common, rank=dim, cache_draws=16))
    x, report = sampled.solve(b)
    assert_close(x, exact, CG)  # preconditioned CG corrects the Monte Carlo estimate on the eval batch
    assert report.converged and report.relative_residual <= 1.5e-8
    assert report.extra["cache"]["record_passes"] == len(subset) and report.extra["cached_top_eigenvalue"] > 0

    # damping does not change the curvature: one cache serves every damping the pipeline escalates to
    shared = InfluenceSystem(model, tokenizer, subset, replace(sampled.config, damping=10 * sampled.config.damping),
                             cache=sampled.curvature_cache())
    assert shared.curvature_cache() is sampled.curvature_cache() and shared.record_passes == 0
    with pytest.raises(StaleCurvatureError, match="cache_draws"):  # what it was built with does
        InfluenceSystem(model, tokenizer, subset, SolveConfig(**common, rank=dim), cache=sampled.curvature_cache())


def test_a_cache_of_another_adapter_version_is_refused(tiny_model, records, tokenizer):
    config = SolveConfig(solver="eigen", damping=1.0, damping_mode="absolute", eval_size=2, cache_samples=2, rank=8)
    system = InfluenceSystem(tiny_model, tokenizer, records[:2], config)
    cache = system.curvature_cache()
    apply_step(tiny_model, torch.full((system.dim,), 1e-3, dtype=torch.float64))
    with pytest.raises(StaleCurvatureError, match="rebuild"):
        system.solve(torch.ones(system.dim, dtype=torch.float64))
    with pytest.raises(StaleCurvatureError):
        InfluenceSystem(tiny_model, tokenizer, records[:2], config, cache=cache)


def test_eigen_with_a_sampled_cache_needs_the_gauss_newton_curvature():
    from eraser.errors import EraserError

    with pytest.raises(EraserError, match="curvature 'ggn'"):
        SolveConfig(solver="eigen", curvature="hessian")
    SolveConfig(solver="eigen", curvature="hessian", cache_method="hvp")  # exact HVPs: allowed
