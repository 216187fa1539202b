"""Tolerances in one place, and the comparison every numerical test uses."""

from __future__ import annotations

import torch

EXACT = 1e-9  # float64, same math two ways
CG = 1e-5  # conjugate gradients to convergence
STOCHASTIC = 1e-2  # sgd / lissa with enough iterations
DISTRIBUTED = 1e-5  # float32 sums in a different order across workers


def relative_error(actual, expected) -> float:
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    return float((actual - expected).norm() / expected.norm().clamp(min=1e-300))


def assert_close(actual, expected, rtol: float) -> None:
    error = relative_error(actual, expected)
    assert error <= rtol, f"relative error {error:.3g} > {rtol:g}"
