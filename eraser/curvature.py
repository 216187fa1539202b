"""Gradients and Hessian-vector products of the training loss, over the LoRA parameters only.

Everything here returns *sums* over the records of a batch (``sum_i grad l(z_i)``,
``sum_i H_i v``), not means: a caller that shards records over workers adds the sums with one
all-reduce and divides by the total count once. The model must be in eval mode (no LoRA dropout)
with an attention implementation that supports double backward (``eager``; see docs/operations.md#pitfalls-of-the-stack).

Two curvatures of ``l(z) = sum_t w_t CE(f_t(theta), y_t)`` (``w_t`` = 1/response tokens):
- ``hessian``: the exact Hessian, by double backward. Indefinite for LoRA (the A/B product alone
  makes it so), so a solve needs damping.
- ``ggn``: the generalised Gauss-Newton matrix ``sum_t w_t J_t^T (diag(p_t) - p_t p_t^T) J_t``,
  positive semi-definite. ``J v`` is formed with the double-vjp trick (no forward-mode AD, which the
  fused attention kernels do not support).

Device and precision (:mod:`eraser.devices`): everything is computed on the model's device, and what
is returned is in the accumulation dtype (float32 for a half-precision model): vectors passed in are
cast to the parameters' dtype only where autograd needs it.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from eraser.devices import accumulation_dtype, seeded_generator
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
    """``vector`` cut into tensors shaped like ``like``, on their device and in their dtype."""
    if like and (vector.dtype != like[0].dtype or vector.device != like[0].device):
        vector = vector.to(device=like[0].device, dtype=like[0].dtype)
    parts, offset = [], 0
    for t in like:
        parts.append(vector[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return parts


def num_parameters(params: Sequence[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)


def _accumulated(vector: torch.Tensor) -> torch.Tensor:
    return vector.to(accumulation_dtype(vector.dtype))


def gradient_sum(model, params: Sequence[torch.nn.Parameter], batch: Batch) -> torch.Tensor:
    """``sum_{i in batch} grad l(z_i; theta)`` as a flat vector (p,)."""
    loss = record_losses(model, batch).sum()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return _accumulated(flatten([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]).detach())


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
    return _accumulated(flatten(hv).detach())


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
    return _accumulated(flatten(_grads_or_zeros(logits, params, h_jv)).detach())


# -- per-record gradients of the LoRA factors (for low-rank curvature caches) ------------------
class _LoraTaps:
    """Forward hooks on the LoRA ``nn.Linear`` modules that own ``params``: they keep each module's
    input (B, T, in) and output (B, T, out), so that per-record weight gradients are
    ``sum_t dL/dout[b, t] (x) in[b, t]`` from one batched backward to the outputs."""

    def __init__(self, model, params: Sequence[torch.nn.Parameter]):
        owners = {id(p): name for name, p in model.named_parameters()}
        self.modules = []
        for p in params:
            module_name, _, leaf = owners[id(p)].rpartition(".")
            module = model.get_submodule(module_name)
            if leaf != "weight" or not isinstance(module, torch.nn.Linear) or module.bias is not None:
                raise ValueError(f"per-record gradients need bias-free nn.Linear LoRA factors, got {owners[id(p)]!r}")
            self.modules.append(module)
        self.taps: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles = []

    def __enter__(self) -> "_LoraTaps":
        for module in self.modules:
            self.handles.append(module.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _hook(self, module, inputs, output) -> None:
        if id(module) in self.taps:
            raise ValueError("a LoRA module ran twice in one forward; per-record gradients need one call")
        self.taps[id(module)] = (inputs[0], output)

    def outputs(self) -> list[torch.Tensor]:
        return [self.taps[id(m)][1] for m in self.modules]

    def per_record(self, output_grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-record gradients (B, p), in the order of ``params``, from gradients w.r.t. ``outputs()``."""
        parts = []
        for module, grad in zip(self.modules, output_grads):
            inputs = self.taps[id(module)][0].detach()  # (B, T, in)
            dtype = accumulation_dtype(grad.dtype)  # a sum over tokens: float32 for half-precision factors
            per_record = torch.einsum("bto,bti->boi", grad.to(dtype), inputs.to(dtype))  # (B, out, in)
            parts.append(per_record.reshape(per_record.shape[0], -1))
        return torch.cat(parts, dim=1)


def per_record_gradients(model, params: Sequence[torch.nn.Parameter], batch: Batch) -> torch.Tensor:
    """``grad l(z_i; theta)`` for each record of the batch, as rows (B, p), from one batched backward."""
    with _LoraTaps(model, params) as taps:
        loss = record_losses(model, batch).sum()
        outputs = taps.outputs()
        grads = torch.autograd.grad(loss, outputs, allow_unused=True)
        grads = [torch.zeros_like(o) if g is None else g for g, o in zip(grads, outputs)]
        return taps.per_record(grads).detach()


def sample_from_cdf(cdf: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One label per position by inversion: the first ``y`` with ``cdf[..., y] > u * cdf[..., -1]``.

    ``cdf`` (..., V) is the cumulative softmax on the model's device, ``uniforms`` (...) in [0, 1) drawn on
    the CPU from a seeded generator: the labels are the same on every device (up to ties within the
    rounding of ``cdf``), unlike ``torch.multinomial`` with a device generator, and only one number per
    position crosses to the device."""
    target = (uniforms.to(device=cdf.device, dtype=cdf.dtype) * cdf[..., -1]).unsqueeze(-1)  # (..., 1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)


def sampled_ggn_factor(
    model,
    params: Sequence[torch.nn.Parameter],
    batch: Batch,
    draws: int = 1,
    seeds: Sequence[int] | None = None,
) -> torch.Tensor:
    """Rows ``f`` (B * draws, p) whose outer products estimate the records' Gauss-Newton matrices without
    bias: ``E[sum_rows f f^T] = sum_{i in batch} G_i``.

    For record i, ``f = grad_theta sum_t sqrt(w_t) CE(f_t(theta), y_t) / sqrt(draws)`` with labels
    ``y_t ~ softmax(f_t)`` drawn from the model itself: ``E[(p - e_y)(p - e_y)^T] = diag(p) - p p^T`` is
    the output Hessian of the cross-entropy, and the cross terms between tokens vanish because
    ``E[p - e_y] = 0`` (the "true Fisher" sampling of K-FAC, Martens & Grosse 2015, Sec. 5).
    Rows are ordered draw-major: row ``d * B + i`` is draw d of record i. Record i's labels come from
    its own generator seeded with ``seeds[i]``, so the rows do not depend on how records are batched;
    the generator draws uniforms on the CPU (:func:`sample_from_cdf`), so neither on the device.
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws!r}")
    seeds = list(seeds) if seeds is not None else list(range(len(batch)))
    if len(seeds) != len(batch):
        raise ValueError(f"need one seed per record: {len(seeds)} seeds for {len(batch)} records")
    generators = [seeded_generator(seed) for seed in seeds]
    with _LoraTaps(model, params) as taps:
        logits, labels = shifted_logits_and_labels(model, batch)  # (B, T, V), (B, T)
        root_weights = token_weights(labels).to(logits.dtype).sqrt()  # (B, T)
        cdf = torch.softmax(logits.detach(), dim=-1).cumsum(dim=-1)  # (B, T, V)
        outputs = taps.outputs()
        # One uniform per target position of each record (padding takes none), so a record's labels
        # depend on its seed alone, not on the batch's width.
        targets = [max(0, int(n) - 1) for n in batch.attention_mask.sum(dim=1).tolist()]
        rows = []
        for draw in range(draws):
            uniforms = torch.zeros(labels.shape, dtype=torch.float64, device="cpu")  # (B, T): drawn on the CPU
            for i, (g, n) in enumerate(zip(generators, targets)):
                uniforms[i, :n] = torch.rand(n, generator=g, dtype=torch.float64, device="cpu")
            sampled = sample_from_cdf(cdf, uniforms)  # (B, T)
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), sampled.reshape(-1), reduction="none"
            ).view(labels.shape)  # (B, T)
            loss = (nll * root_weights).sum()
            grads = torch.autograd.grad(loss, outputs, retain_graph=draw + 1 < draws, allow_unused=True)
            grads = [torch.zeros_like(o) if g is None else g for g, o in zip(grads, outputs)]
            rows.append(taps.per_record(grads).detach())
        return torch.cat(rows) / draws**0.5
