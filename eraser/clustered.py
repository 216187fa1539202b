"""Two-sided tests of "these records look like the reference records", for records correlated by subject.

Records of one subject share what the model knows about the subject, so they are not independent
draws: on TOFU (20 records per author) the per-author means of the membership score spread by 0.22
where single records spread by 0.37. A rank test over records treats 40 records of 2 authors as 40
independent draws and rejects an exact retrain by chance far more often than its level says. Both
tests here use the one-way random-effects model ``y_gi = mu + b_g + e_gi`` (``b_g`` the subject effect,
variance ``sigma_b^2``; ``e_gi`` the record's, variance ``sigma_w^2``) fitted to the reference by the
method of moments, and Student's t with (reference subjects - 1) degrees of freedom, so a small
reference widens the test instead of overstating it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np
from scipy import stats

from eraser.errors import EraserError


@dataclass(frozen=True)
class VarianceComponents:
    """The reference's mean and its random-effects variances."""

    mean: float
    within: float  # sigma_w^2
    between: float  # sigma_b^2
    subjects: int
    records: int
    mean_variance: float  # variance of ``mean`` itself

    @property
    def df(self) -> int:
        """Degrees of freedom of the t reference: subjects - 1 when records cluster, else records - 1."""
        return max(1, (self.subjects if self.subjects < self.records else self.records) - 1)


def _cluster_sizes(groups: Sequence[Hashable]) -> np.ndarray:
    _, counts = np.unique(np.asarray([str(g) for g in groups]), return_counts=True)
    return counts


def mean_variance(components: VarianceComponents, groups: Sequence[Hashable]) -> float:
    """Variance of the mean of records drawn in clusters of the given sizes: ``sigma_b^2 sum n_g^2 / N^2 +
    sigma_w^2 / N``."""
    sizes = _cluster_sizes(groups)
    n = float(sizes.sum())
    return components.between * float((sizes**2).sum()) / n**2 + components.within / n


def variance_components(values: Sequence[float], groups: Sequence[Hashable]) -> VarianceComponents:
    """Method-of-moments fit of the random-effects model to the reference (needs >= 2 records)."""
    y = np.asarray(values, dtype=float)
    if len(y) < 2 or len(y) != len(groups):
        raise EraserError("variance_components needs at least 2 reference values, one group label each")
    labels = np.asarray([str(g) for g in groups])
    keys = sorted(set(labels))
    means = np.array([y[labels == k].mean() for k in keys])
    sizes = np.array([(labels == k).sum() for k in keys])
    resid = sum(float(((y[labels == k] - m) ** 2).sum()) for k, m in zip(keys, means))
    within = resid / (len(y) - len(keys)) if len(y) > len(keys) else float(np.var(y, ddof=1))
    if len(keys) >= 2 and len(keys) < len(y):
        between = max(0.0, float(np.var(means, ddof=1)) - within * float(np.mean(1.0 / sizes)))
    else:
        between = 0.0
    components = VarianceComponents(mean=float(y.mean()), within=max(within, 1e-12), between=between,
                                    subjects=len(keys), records=len(y), mean_variance=0.0)
    return VarianceComponents(**{**components.__dict__, "mean_variance": mean_variance(components, list(labels))})


def group_test(values: Sequence[float], groups: Sequence[Hashable], reference: VarianceComponents) -> tuple[float, float]:
    """``(two-sided p, t)`` of "the mean of ``values`` is the reference's", ``values`` clustered by ``groups``."""
    diff = float(np.mean(values)) - reference.mean
    scale = math.sqrt(mean_variance(reference, groups) + reference.mean_variance)
    t = diff / max(scale, 1e-12)
    return float(2 * stats.t.sf(abs(t), reference.df)), t


def _predictive_scale(reference: VarianceComponents) -> float:
    """Scale of one more reference record (a new subject's: ``sigma_b^2 + sigma_w^2``, plus the
    uncertainty of the reference mean)."""
    return max(math.sqrt(reference.between + reference.within + reference.mean_variance), 1e-12)


def record_tests(values: Sequence[float], reference: VarianceComponents) -> tuple[list[float], list[float]]:
    """Per value, ``(lower, upper)`` tail p-values under the predictive distribution of one more reference
    record (:func:`_predictive_scale`)."""
    t = (np.asarray(values, dtype=float) - reference.mean) / _predictive_scale(reference)
    return [float(p) for p in stats.t.cdf(t, reference.df)], [float(p) for p in stats.t.sf(t, reference.df)]


def record_upper_bound(reference: VarianceComponents, level: float) -> float:
    """The largest value whose upper tail under :func:`record_tests`' predictive distribution is still
    >= ``level``: the pass bound of an upper-tail test at that level (p falls as the value grows)."""
    return reference.mean + _predictive_scale(reference) * float(stats.t.isf(level, reference.df))


def attack_auc(members: Sequence[float], reference: Sequence[float]) -> float:
    """AUC of the attack "lower score = member" separating ``members`` from ``reference`` (0.5 = chance)."""
    u = stats.mannwhitneyu(members, reference, alternative="two-sided").statistic  # #{x > y} + ties / 2
    return 1.0 - float(u) / (len(members) * len(reference))
