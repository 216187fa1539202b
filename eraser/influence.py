"""The influence system of one adapter version: ``b`` for a set of edits and the damped solve.

:class:`InfluenceSystem` is the one place that holds state (model, records, cached top eigenvalue).
Records may be sharded over workers: a worker computes only the records whose global index
``i % world_size == rank`` and ``Shard.reduce`` sums tensors across workers (an all-reduce in
``cluster``; the identity in one process). Minibatches are drawn over *global* indices from the
seed, so N workers compute exactly the sums one process would (up to floating-point order).
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal, Sequence

import torch

from eraser.curvature import CURVATURES, gradient_sum, hvp_sum, lora_parameters, num_parameters, sampled_ggn_factor
from eraser.devices import accumulation_dtype, dtype_name, model_device
from eraser.errors import EraserError, StaleCurvatureError, require_counts
from eraser.records import Record, collate
from eraser.requests import Edit
from eraser import solvers

logger = logging.getLogger(__name__)

DEFAULT_TOL = {"cg": 1e-3, "sgd": 5e-2, "lissa": 5e-2, "eigen": 5e-2}
CACHE_METHODS: tuple[str, ...] = ("sampled", "hvp")


@dataclass(frozen=True)
class SolveConfig:
    """How to solve ``(C + lambda I) x = b``. Defaults chosen by measurement (see README, benchmarks)."""

    solver: str = "cg"  # cg | sgd | lissa | eigen (cached low-rank curvature + preconditioned CG)
    curvature: str = "ggn"  # ggn (PSD, stable) | hessian (exact, indefinite)
    damping: float = 0.01  # lambda; relative to the top curvature eigenvalue unless damping_mode="absolute"
    damping_mode: Literal["relative", "absolute"] = "relative"
    tol: float | None = None  # relative residual target; None = the solver's default (DEFAULT_TOL)
    max_iters: int = 200  # eigen: CG refinement steps after the low-rank solution (0: none)
    batch_size: int = 32  # records per stochastic HVP (sgd, lissa)
    eval_size: int = 256  # records in the fixed batch for residuals (and cg's operator)
    micro_batch: int = 16  # records per forward/backward, bounds memory
    lr_scale: float = 1.0  # sgd step = lr_scale / lambda_max(C + lambda I)
    momentum: float = 0.0  # sgd heavy-ball momentum
    power_iters: int = 20  # iterations to estimate the top eigenvalue
    check_every: int = 10  # stochastic solvers: residual check period
    seed: int = 0
    require_converged: bool = True
    # eigen: the low-rank curvature cached per adapter version (see CurvatureCache / curvature_cache()).
    rank: int = 256  # eigenpairs kept
    cache_samples: int = 256  # records the cached curvature is estimated on
    cache_draws: int = 2  # sampled: label draws per record (rows of the factor = samples * draws)
    cache_method: str = "sampled"  # sampled (one batched backward per draw) | hvp (subspace iteration, exact, costly)
    cache_iters: int = 2  # hvp: subspace iterations
    # Memory per adapter version for the cached curvature (its p x rank float32 vectors) and for what builds
    # it (the sampled factor's rows, or the subspace iteration's two blocks), MiB; None: unbounded. The rank
    # and the rows are cut to fit (curvature_plan): 2 GiB keeps today's sizes as configured (p = 0.85 M:
    # 512 rows, 1.6 GiB) and bounds an 8B adapter's (p = 42 M) to rank 12, so dozens of tenants stay warm.
    cache_budget_mib: float | None = 2048.0

    def __post_init__(self) -> None:
        if self.solver not in solvers.SOLVERS:
            raise EraserError(f"solver must be one of {solvers.SOLVERS}, got {self.solver!r}")
        if self.curvature not in CURVATURES:
            raise EraserError(f"curvature must be one of {CURVATURES}, got {self.curvature!r}")
        if not (self.damping > 0 and math.isfinite(self.damping)):
            raise EraserError(f"damping must be a positive number, got {self.damping!r}")
        if self.damping_mode not in ("relative", "absolute"):
            raise EraserError(f"damping_mode must be 'relative' or 'absolute', got {self.damping_mode!r}")
        if self.cache_method not in CACHE_METHODS:
            raise EraserError(f"cache_method must be one of {CACHE_METHODS}, got {self.cache_method!r}")
        if self.solver == "eigen" and self.cache_method == "sampled" and self.curvature != "ggn":
            raise EraserError("solver 'eigen' with cache_method 'sampled' estimates the Gauss-Newton matrix: "
                              f"use curvature 'ggn' (got {self.curvature!r}) or cache_method 'hvp'")
        if self.max_iters < (0 if self.solver == "eigen" else 1):
            raise EraserError(f"max_iters must be >= 1 (>= 0 for solver 'eigen': keep the low-rank solution), "
                              f"got {self.max_iters!r}")
        require_counts(self, ("batch_size", "eval_size", "micro_batch", "power_iters", "check_every",
                              "rank", "cache_samples", "cache_draws"))
        if self.cache_budget_mib is not None and not (self.cache_budget_mib > 0 and math.isfinite(self.cache_budget_mib)):
            raise EraserError(f"cache_budget_mib must be a positive number or None, got {self.cache_budget_mib!r}")
        if self.cache_iters < 0:
            raise EraserError(f"cache_iters must be >= 0, got {self.cache_iters!r}")
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


def adapter_fingerprint(params: Sequence[torch.Tensor]) -> str:
    """sha256 of the LoRA weights: which adapter version a cached curvature belongs to."""
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


# The SolveConfig fields a cached curvature depends on (damping, tolerances and the solver's own
# iterations do not change it, so one cache serves every damping the pipeline escalates through).
CURVATURE_CACHE_FIELDS = ("curvature", "cache_method", "rank", "cache_samples", "cache_draws", "cache_iters", "seed",
                          "cache_budget_mib")
SUBSPACE_OVERSAMPLE = 10  # solvers.subspace_iteration's default


@dataclass(frozen=True)
class CurvaturePlan:
    """What the cached curvature of a p-parameter adapter is built from and keeps, within the budget."""

    dim: int
    method: str
    rank: int  # eigenpairs kept (at most)
    samples: int  # records it is estimated on (at most; the training set may be smaller)
    draws: int
    cached_bytes: int  # the kept vectors (p x rank) and values, float32
    build_bytes: int  # the factor (sampled) or the two subspace blocks (hvp), float32
    budget_bytes: int | None
    limited: bool  # the budget cut the configured rank or samples
    oversample: int = 0  # hvp: extra vectors of the subspace block

    def to_dict(self) -> dict:
        return asdict(self)


def curvature_plan(config: SolveConfig, dim: int, records: int | None = None) -> CurvaturePlan:
    """The rank and samples of ``config``'s cached curvature for an adapter of ``dim`` parameters, cut so
    that the kept vectors and what builds them each fit ``config.cache_budget_mib`` (float32, 4 bytes per
    coordinate). ``sampled``: rows = samples x draws of the factor, rank <= rows; fewer samples first
    (the draws stay). ``hvp``: two blocks of rank + oversample vectors (the oversampling shrinks first). Raises EraserError when not even
    the smallest form fits (one record's draws, or two blocks of two vectors)."""
    vector = 4 * dim
    samples = min(config.cache_samples, records) if records is not None else config.cache_samples
    budget = int(config.cache_budget_mib * 2**20) if config.cache_budget_mib is not None else None
    fits = budget // vector if budget is not None else None  # float32 vectors of length p within the budget
    if config.cache_method == "hvp":
        rank, oversample = config.rank, SUBSPACE_OVERSAMPLE
        if fits is not None and 2 * (rank + oversample) > fits:
            width = fits // 2
            if width < 2:
                raise EraserError(f"a curvature budget of {config.cache_budget_mib:g} MiB holds {fits} vector(s) of "
                                  f"{dim} parameters: too few for cache_method 'hvp' (two blocks of 2)")
            oversample = min(SUBSPACE_OVERSAMPLE, width // 2)  # a narrow block gives up oversampling first
            rank = min(rank, width - oversample)
        rank = min(rank, dim)
        width = min(dim, rank + oversample)
        return CurvaturePlan(dim=dim, method="hvp", rank=rank, samples=samples, draws=config.cache_draws,
                             cached_bytes=rank * (vector + 4), build_bytes=2 * width * vector, budget_bytes=budget,
                             limited=rank < config.rank, oversample=oversample)
    draws, wanted = config.cache_draws, samples
    if fits is not None:
        if fits < draws:
            raise EraserError(f"a curvature budget of {config.cache_budget_mib:g} MiB holds {fits} row(s) of "
                              f"{dim} parameters: fewer than one record's {draws} draws (raise cache_budget_mib)")
        samples = min(samples, fits // draws)
    rank = min(config.rank, samples * draws)
    return CurvaturePlan(dim=dim, method="sampled", rank=rank, samples=samples, draws=draws,
                         cached_bytes=rank * (vector + 4), build_bytes=samples * draws * vector, budget_bytes=budget,
                         limited=samples < wanted)


def curvature_cache_key(config: SolveConfig) -> dict:
    return {name: getattr(config, name) for name in CURVATURE_CACHE_FIELDS}


def curvature_mismatch(cache: "solvers.LowRankCurvature", params: Sequence[torch.Tensor],
                       config: SolveConfig) -> str | None:
    """Why ``cache`` cannot stand for the curvature of the adapter ``params`` under ``config`` (None: it can)."""
    dim = num_parameters(params)
    if cache.vectors.shape[0] != dim:
        return f"cached curvature has dimension {cache.vectors.shape[0]}, the adapter {dim}"
    built_for = cache.info.get("adapter")
    if built_for is not None and built_for != adapter_fingerprint(params):
        return (f"cached curvature was built for adapter weights {built_for[:12]}, not these "
                f"({adapter_fingerprint(params)[:12]}): rebuild it for this adapter version")
    built_with = cache.info.get("config")
    if built_with is not None and built_with != curvature_cache_key(config):
        changed = sorted(k for k in CURVATURE_CACHE_FIELDS if built_with.get(k) != getattr(config, k))
        return f"cached curvature was built with other settings ({', '.join(changed)})"
    return None


def _base_dtype(model) -> torch.dtype:
    """The dtype the (frozen) base computes in: its first non-LoRA floating-point parameter's."""
    for name, p in model.named_parameters():
        if "lora_" not in name and p.is_floating_point():
            return p.dtype
    return torch.float32


class InfluenceSystem:
    """Gradients and the damped curvature operator of ``L(theta) = (1/n) sum_i l(z_i)`` at one adapter.

    With ``solver="eigen"`` it holds a :class:`~eraser.solvers.LowRankCurvature` of the adapter, built on
    first use (:meth:`curvature_cache`) or passed in (``cache=``, e.g. built in the background after the
    adapter version was published); requests on the same version then share it.
    """

    def __init__(self, model, tokenizer, records: Sequence[Record], config: SolveConfig, shard: Shard | None = None,
                 cache: "solvers.LowRankCurvature | None" = None):
        if not records:
            raise EraserError("no training records: the curvature needs the adapter's training set")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.records = list(records)
        self.config = config
        self.shard = shard or Shard()
        self.params = lora_parameters(model)
        self.dim = num_parameters(self.params)
        # Where and in what precision every vector of the system lives (eraser.devices): the model's
        # device; float32 for a half-precision adapter, the adapter's own dtype otherwise.
        self.device = model_device(model)
        self.dtype = accumulation_dtype(self.params[0].dtype)
        self.record_passes = 0  # records pushed through an HVP or gradient by this worker
        self._top_eigenvalue: float | None = None
        self._cache = cache
        rng = random.Random(config.seed)
        n = len(self.records)
        self.eval_indices = sorted(rng.sample(range(n), min(config.eval_size, n)))
        if cache is not None:
            self._check_cache(cache)
            self._cache = cache.to(self.device)  # a warmed curvature arrives on the CPU

    # -- sums over (global) record indices, computed on this shard, reduced across shards ---------
    def _local_micro_batches(self, records_with_index: Sequence[tuple[int, Record]]):
        mine = [record for index, record in records_with_index if self.shard.owns(index)]
        step = self.config.micro_batch
        for start in range(0, len(mine), step):
            chunk = mine[start : start + step]
            self.record_passes += len(chunk)
            yield collate(chunk, self.tokenizer, self.device)

    def curvature_mean(self, indices: Sequence[int], vector: torch.Tensor) -> torch.Tensor:
        """``(1/|I|) sum_{i in I} C_i v`` (undamped), I global record indices."""
        total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for batch in self._local_micro_batches([(i, self.records[i]) for i in indices]):
            total += hvp_sum(self.model, self.params, batch, vector, self.config.curvature)
        return self.shard.reduce(total) / len(indices)

    def gradient_of_edits(self, edits: Sequence[Edit]) -> torch.Tensor:
        """``b = (1/n) sum_{i in S} [grad l(z_i) - grad l(z'_i)]`` (docs/method.md#the-influence-estimate)."""
        if not edits:
            raise EraserError("no edits: nothing to erase")
        old = [(j, edit.old) for j, edit in enumerate(edits)]
        new = [(j, edit.new) for j, edit in enumerate(edits) if edit.new is not None]
        total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
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

    # -- the cached low-rank curvature (solver "eigen") -------------------------------------------
    def curvature_plan(self) -> CurvaturePlan:
        """The cached curvature's rank and samples for this adapter within ``cache_budget_mib``."""
        return curvature_plan(self.config, self.dim, len(self.records))

    def cache_indices(self) -> list[int]:
        n = len(self.records)
        rng = random.Random(self.config.seed * 7_368_787 + 11)
        return sorted(rng.sample(range(n), min(self.curvature_plan().samples, n)))

    def curvature_cache(self) -> "solvers.LowRankCurvature":
        """The top ``rank`` eigenpairs of the curvature on ``cache_samples`` records, built once per adapter.

        ``sampled`` (default): the Gauss-Newton matrix estimated from per-record gradients with labels
        drawn from the model (:func:`~eraser.curvature.sampled_ggn_factor`), ``cache_draws`` batched
        backward passes per record, then an m x m eigendecomposition. ``hvp``: randomized subspace
        iteration with exact HVPs, ``(cache_iters + 1) * (rank + 10)`` HVPs over the sample.
        """
        if self._cache is not None:
            return self._cache
        cfg = self.config
        started = time.perf_counter()
        passes_before = self.record_passes
        plan = self.curvature_plan()
        indices = self.cache_indices()
        if plan.limited:
            logger.info("curvature budget %g MiB for p = %d: rank %d on %d records (configured: rank %d on %d)",
                        cfg.cache_budget_mib, self.dim, plan.rank, plan.samples, cfg.rank, cfg.cache_samples)
        if cfg.cache_method == "hvp":
            cache = solvers.subspace_iteration(lambda v: self.curvature_mean(indices, v), self.dim, plan.rank,
                                               oversample=plan.oversample, iters=cfg.cache_iters, seed=cfg.seed,
                                               dtype=self.dtype, device=self.device)
        else:
            cache = solvers.eigen_from_factor(self.sampled_factor(indices), plan.rank, count=len(indices))
        cache.info.update(method=cfg.cache_method, samples=len(indices), draws=cfg.cache_draws,
                          curvature=cfg.curvature, record_passes=self.record_passes - passes_before,
                          wall_time_s=time.perf_counter() - started, adapter=adapter_fingerprint(self.params),
                          config=curvature_cache_key(cfg), device=str(self.device), plan=plan.to_dict(),
                          model_dtype=dtype_name(_base_dtype(self.model)), dtype=dtype_name(self.dtype))
        logger.info("cached %s curvature: rank %d, top eigenvalue %.4g, %d records, %.1fs", cfg.cache_method,
                    cache.rank, cache.top, len(indices), cache.info["wall_time_s"])
        self._cache = cache
        return cache

    def sampled_factor(self, indices: Sequence[int]) -> torch.Tensor:
        """The sampled Gauss-Newton factor ``F`` (draws * m, p) of the records ``indices`` (global), on the
        model's device and reduced over shards: ``F^T F / m`` estimates their mean curvature."""
        cfg = self.config
        m = len(indices)
        factor = torch.zeros(cfg.cache_draws * m, self.dim, dtype=self.dtype, device=self.device)  # (draws * m, p)
        positions = {index: j for j, index in enumerate(indices)}
        mine = [(i, self.records[i]) for i in indices if self.shard.owns(i)]
        for start in range(0, len(mine), cfg.micro_batch):
            chunk = mine[start : start + cfg.micro_batch]
            self.record_passes += len(chunk)
            seeds = [cfg.seed * 1_000_003 + i for i, _ in chunk]
            # collated on the CPU: the factor reads each record's length there (the model moves the batch)
            rows = sampled_ggn_factor(self.model, self.params, collate([r for _, r in chunk], self.tokenizer),
                                      draws=cfg.cache_draws, seeds=seeds)  # (draws * B, p)
            for d in range(cfg.cache_draws):
                for k, (i, _) in enumerate(chunk):
                    factor[d * m + positions[i]] = rows[d * len(chunk) + k]
        return self.shard.reduce(factor)

    def _check_cache(self, cache: "solvers.LowRankCurvature") -> None:
        why = curvature_mismatch(cache, self.params, self.config)
        if why is not None:
            raise StaleCurvatureError(why)

    def top_eigenvalue(self) -> float:
        """Largest eigenvalue of the (undamped) curvature: the cached low-rank curvature's for ``eigen``,
        else power iteration on the evaluation batch; cached per adapter."""
        if self._top_eigenvalue is None and self.config.solver == "eigen":
            self._top_eigenvalue = self.curvature_cache().top
        if self._top_eigenvalue is None:
            apply = lambda v: self.curvature_mean(self.eval_indices, v)  # noqa: E731
            self._top_eigenvalue = solvers.power_iteration(
                apply, self.dim, iters=self.config.power_iters, seed=self.config.seed, dtype=self.dtype,
                device=self.device)
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
        elif cfg.solver == "eigen":
            cache = self.curvature_cache()
            self._check_cache(cache)  # the model may have been updated in place since the cache was built
            x, report = solvers.lowrank_conjugate_gradient(apply_eval, b, cache, **common)
            report.extra.update(cache={k: v for k, v in cache.info.items() if k != "adapter"})
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
