"""Gradients and Hessian-vector products of the training loss, over the LoRA parameters only.

Everything here returns *sums* over the records of a batch (``sum_i grad l(z_i)``,
``sum_i H_i v``), not means: a caller that shards records over workers adds the sums with one
all-reduce and divides by the total count once. The model must be in eval mode (no LoRA dropout)
with an attention implementation that supports double backward (``eager``; see STACK.md).

Two curvatures of ``l(z) = sum_t w_t CE(f_t(theta), y_t)`` (``w_t`` = 1/response tokens):
- ``hessian``: the exact Hessian, by double backward. Indefinite for LoRA (the A/B product alone
  makes it so), so a solve needs damping.
- ``ggn``: the generalised Gauss-Newton matrix ``sum_t w_t J_t^T (diag(p_t) - p_t p_t^T) J_t``,
  positive semi-definite. ``J v`` is formed with the double-vjp trick (no forward-mode AD, which the
  fused attention kernels do not support).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from eraser.records import Batch, record_losses, shifted_logits_and_labels, token_weights

Curvature = Literal["hessian", "ggn"]
CURVATURES: tuple[str, ...] = ("ggn", "hessian")


def lora_parameters(model) -> list[torch.nn.Parameter]:
    """The trainable LoRA tensors in a fixed (name-sorted) order: the coordinates of every vector."""
    named = sorted((name, p) for name, p in model.named_parameters() if "lora_" in name)
    params = [p for _, p in named]
    if not params:
        raise ValueError("model has no LoRA parameters (is it a PEFT LoRA model?)")
    for p in params:
        p.requires_grad_(True)
    return params


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    parts, offset = [], 0
    for t in like:
        parts.append(vector[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return parts


def num_parameters(params: Sequence[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)


def gradient_sum(model, params: Sequence[torch.nn.Parameter], batch: Batch) -> torch.Tensor:
    """``sum_{i in batch} grad l(z_i; theta)`` as a flat vector (p,)."""
    loss = record_losses(model, batch).sum()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return flatten([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]).detach()


def hvp_sum(
    model,
    params: Sequence[torch.nn.Parameter],
    batch: Batch,
    vector: torch.Tensor,
    curvature: Curvature = "ggn",
) -> torch.Tensor:
    """``sum_{i in batch} C_i v`` with ``C_i`` the Hessian or Gauss-Newton matrix of ``l(z_i)``. (p,)"""
    if curvature == "hessian":
        return _hessian_vector_sum(model, params, batch, vector)
    if curvature == "ggn":
        return _ggn_vector_sum(model, params, batch, vector)
    raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")


def _grads_or_zeros(outputs, params, grad_outputs, **kwargs) -> list[torch.Tensor]:
    grads = torch.autograd.grad(outputs, params, grad_outputs=grad_outputs, allow_unused=True, **kwargs)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def _hessian_vector_sum(model, params, batch: Batch, vector: torch.Tensor) -> torch.Tensor:
    loss = record_losses(model, batch).sum()
    grads = _grads_or_zeros(loss, params, None, create_graph=True)
    hv = _grads_or_zeros(grads, params, unflatten(vector, params))
    return flatten(hv).detach()


def _ggn_vector_sum(model, params, batch: Batch, vector: torch.Tensor) -> torch.Tensor:
    logits, labels = shifted_logits_and_labels(model, batch)  # (B, T, V), (B, T)
    # J v by the double-vjp trick: g(u) = J^T u is linear in u, and d<g(u), v>/du = J v.
    probe = torch.zeros_like(logits, requires_grad=True)
    jt_probe = _grads_or_zeros(logits, params, probe, create_graph=True, retain_graph=True)
    jv = torch.autograd.grad(jt_probe, probe, grad_outputs=unflatten(vector, params), retain_graph=True)[0]
    # Output-space Hessian of w_t * CE at logits: w_t (diag(p) - p p^T), applied to J v.
    probs = torch.softmax(logits.detach(), dim=-1)  # (B, T, V)
    weights = token_weights(labels).to(logits.dtype).unsqueeze(-1)  # (B, T, 1)
    h_jv = weights * probs * (jv - (probs * jv).sum(dim=-1, keepdim=True))  # (B, T, V)
    return flatten(_grads_or_zeros(logits, params, h_jv)).detach()
