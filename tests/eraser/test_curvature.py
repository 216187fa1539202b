"""Gradients and HVPs against finite differences and explicit float64 Hessians."""

from __future__ import annotations

import pytest
import torch

from eraser.curvature import flatten, gradient_sum, hvp_sum, lora_parameters, unflatten
from eraser.records import collate, record_losses, shifted_logits_and_labels, token_weights

from tests.tolerances import assert_close


def _loss_at(model, params, batch, vector):
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        for p, v in zip(params, unflatten(vector, params)):
            p.copy_(v)
        loss = record_losses(model, batch).sum()
        for p, s in zip(params, saved):
            p.copy_(s)
    return float(loss)


def explicit_hessian(model, params, batch) -> torch.Tensor:
    loss = record_losses(model, batch).sum()
    grad = flatten(torch.autograd.grad(loss, params, create_graph=True))
    rows = [flatten(torch.autograd.grad(grad[i], params, retain_graph=True)) for i in range(grad.numel())]
    return torch.stack(rows)


def explicit_ggn(model, params, batch) -> torch.Tensor:
    """sum_t w_t J_t^T (diag p - p p^T) J_t, with the Jacobian of the logits built row by row."""
    logits, labels = shifted_logits_and_labels(model, batch)
    weights = token_weights(labels)
    probs = torch.softmax(logits.detach(), dim=-1)
    dim = sum(p.numel() for p in params)
    ggn = torch.zeros(dim, dim, dtype=torch.float64)
    for b, t in zip(*torch.nonzero(weights > 0, as_tuple=True)):
        rows = [flatten(torch.autograd.grad(logits[b, t, v], params, retain_graph=True)) for v in range(logits.shape[-1])]
        jac = torch.stack(rows)  # (V, p)
        p = probs[b, t]
        h_out = torch.diag(p) - torch.outer(p, p)
        ggn += weights[b, t] * jac.T @ h_out @ jac
    return ggn


def test_gradient_matches_central_finite_differences(tiny_model, records, tokenizer):
    params = lora_parameters(tiny_model)
    batch = collate(records[:4], tokenizer)
    grad = gradient_sum(tiny_model, params, batch)
    theta = flatten([p.detach() for p in params]).clone()
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):
        direction = torch.randn(theta.shape, generator=generator, dtype=theta.dtype)
        eps = 1e-5
        fd = (_loss_at(tiny_model, params, batch, theta + eps * direction)
              - _loss_at(tiny_model, params, batch, theta - eps * direction)) / (2 * eps)
        assert_close(float(grad @ direction), fd, rtol=1e-6)


def test_hessian_vector_product_matches_explicit_hessian(tiny_model, records, tokenizer):
    params = lora_parameters(tiny_model)
    batch = collate(records[:3], tokenizer)
    hessian = explicit_hessian(tiny_model, params, batch)
    assert_close(hessian, hessian.T, rtol=1e-8)
    assert torch.linalg.eigvalsh(hessian).min() < 0, "the LoRA Hessian is expected to be indefinite"
    v = torch.randn(hessian.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert_close(hvp_sum(tiny_model, params, batch, v, "hessian"), hessian @ v, rtol=1e-9)


def test_gauss_newton_vector_product_matches_explicit_ggn(tokenizer, records):
    from tests.eraser.conftest import tiny_lora_model

    model = tiny_lora_model(tokenizer, rank=1, hidden=16)
    params = lora_parameters(model)
    batch = collate(records[:2], tokenizer)
    ggn = explicit_ggn(model, params, batch)
    assert torch.linalg.eigvalsh(ggn).min() > -1e-10, "the Gauss-Newton matrix must be PSD"
    v = torch.randn(ggn.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert_close(hvp_sum(model, params, batch, v, "ggn"), ggn @ v, rtol=1e-9)


def test_unknown_curvature_is_rejected(tiny_model, records, tokenizer):
    params = lora_parameters(tiny_model)
    with pytest.raises(ValueError, match="curvature"):
        hvp_sum(tiny_model, params, collate(records[:1], tokenizer), torch.zeros(1), "fisher")
