"""The cached curvature within its memory budget: an 8B adapter's (p = 40 M, no model needed) fits the
default, today's sizes are built as configured, and a budgeted build keeps to its plan."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from eraser.errors import EraserError
from eraser.influence import InfluenceSystem, SolveConfig, curvature_mismatch, curvature_plan
from eraser.curvature import lora_parameters
from tests.eraser.conftest import tiny_lora_model

MIB = 2**20


@pytest.mark.parametrize("method", ["sampled", "hvp"])
def test_an_8b_adapters_curvature_fits_the_default_budget(method):
    config = SolveConfig(solver="eigen", cache_method=method, curvature="ggn")
    budget = config.cache_budget_mib * MIB
    for dim in (40_000_000, 41_943_040):  # synthetic p = 40 M; Llama-3-8B with rank 16 on every linear layer
        plan = curvature_plan(config, dim, records=4000)
        assert plan.cached_bytes <= budget and plan.build_bytes <= budget, plan
        assert plan.rank >= 1 and plan.limited  # rank 256 would take 40 GiB
    unbounded = curvature_plan(replace(config, cache_budget_mib=None), 40_000_000)
    assert unbounded.rank == 256 and unbounded.cached_bytes > 38 * 2**30  # what the budget prevents
    with pytest.raises(EraserError, match="budget"):
        curvature_plan(replace(config, cache_budget_mib=100.0), 40_000_000)  # not one record's rows


@pytest.mark.parametrize("dim, samples", [(70_000, 256), (852_000, 256), (34_816, 1024)])
def test_todays_sizes_are_built_as_configured(dim, samples):
    """The demo (p = 70 k), Llama-3.2-1B with rank 8 on q,v (0.85 M) and the TOFU benchmark's cache (p = 35 k,
    1,024 records x 2 draws): the default budget changes nothing, so their fidelity is today's."""
    config = SolveConfig(solver="eigen", cache_samples=samples, rank=min(256, 2 * samples))
    plan = curvature_plan(config, dim, records=4000)
    assert not plan.limited and plan.rank == config.rank and plan.samples == samples


def test_a_budgeted_build_keeps_to_its_plan(records, tokenizer):
    model = tiny_lora_model(tokenizer, dtype=torch.float32)
    dim = sum(p.numel() for p in lora_parameters(model))
    rows = 6  # the budget holds six float32 vectors of length p
    config = SolveConfig(solver="eigen", max_iters=0, damping=0.1, eval_size=4, rank=64, cache_samples=16,
                         cache_budget_mib=(rows * 4 * dim + 1) / MIB)
    system = InfluenceSystem(model, tokenizer, records, config)
    plan = system.curvature_plan()
    assert plan.limited and plan.samples == rows // config.cache_draws and plan.rank <= rows
    cache = system.curvature_cache()
    assert cache.info["samples"] == plan.samples and cache.rank <= plan.rank
    assert cache.vectors.numel() * cache.vectors.element_size() <= config.cache_budget_mib * MIB
    x, _ = system.solve(torch.ones(system.dim))
    assert torch.isfinite(x).all()
    # a cache built under another budget is another cache
    assert "cache_budget_mib" in curvature_mismatch(cache, system.params, replace(config, cache_budget_mib=None))
