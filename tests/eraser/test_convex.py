"""On a strictly convex model the influence update equals exact retraining to second order.

L2-regularised logistic regression, the regulariser inside each record's loss (so the minimiser of
the retained sum does not depend on normalising by n or n - k): removing k points with
``theta + H^-1 b``, ``b = (1/n) sum_S grad l_i`` (the eraser's conjugate gradients), against
retraining to machine precision with Newton's method.
"""

from __future__ import annotations

import torch

from eraser.solvers import conjugate_gradient

REG = 0.05


def per_example_loss(theta, features, labels):  # (n,)
    logits = features @ theta
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none") + 0.5 * REG * theta @ theta


def fit(features, labels, theta=None, iters=30):
    theta = torch.zeros(features.shape[1], dtype=torch.float64) if theta is None else theta.clone()
    objective = lambda t: per_example_loss(t, features, labels).mean()  # noqa: E731
    for _ in range(iters):
        grad = torch.autograd.functional.jacobian(objective, theta)
        hess = torch.autograd.functional.hessian(objective, theta)
        theta = theta - torch.linalg.solve(hess, grad)
    return theta


def test_removing_points_matches_exact_retraining():
    generator = torch.Generator().manual_seed(0)
    n, d, k = 2000, 10, 6
    features = torch.randn(n, d, generator=generator, dtype=torch.float64)
    truth = torch.randn(d, generator=generator, dtype=torch.float64)
    labels = (torch.rand(n, generator=generator, dtype=torch.float64) < torch.sigmoid(features @ truth)).to(torch.float64)
    theta = fit(features, labels)

    removed = torch.arange(k)
    kept = torch.arange(k, n)
    b = torch.autograd.functional.jacobian(
        lambda t: per_example_loss(t, features[removed], labels[removed]).sum(), theta) / n
    hessian_vector = lambda v: torch.autograd.functional.hvp(  # noqa: E731
        lambda t: per_example_loss(t, features, labels).mean(), theta, v)[1]
    step, report = conjugate_gradient(hessian_vector, b, tol=1e-12, max_iters=100)
    erased = theta + step

    gold = fit(features[kept], labels[kept], theta=theta)
    assert report.converged
    relative_to_weights = float((erased - gold).norm() / gold.norm())
    relative_to_change = float((erased - gold).norm() / (theta - gold).norm())
    assert relative_to_weights < 1e-3, relative_to_weights
    assert relative_to_change < 2e-2, relative_to_change  # second-order remainder, O(k/n)
