"""Baselines the benchmark compares the eraser with. None of this is the method (``eraser/``).

- :func:`paper_code_update`: LLMEraser's public code (oceanoceanna/LLMEraser, ``attack_demo.py``,
  ``get_vector_b`` + ``cg_process_grad``) transcribed to this loss: ``b = (sum grad l(z') - sum grad l(z)) / n``
  ("after" minus "before" records), ``x`` initialised to the constant ``x_init`` everywhere, 20 Adam steps
  (lr 1e-5, weight decay 1e-5) on ``0.5 x^T H_B x - b^T x`` with the exact-Hessian HVP on a shuffled
  minibatch of one record and *detached* from ``x`` (so the gradient is ``0.5 H x - b`` and the fixed
  point is ``2 H^-1 b``), then ``theta + x``. Its defects are kept on purpose (docs/operations.md#pitfalls-of-the-stack).
- :func:`gradient_ascent` and :func:`npo`: fine-tuning baselines on the forgotten records (ascent, or
  NPO, Zhang et al. 2024), plus descent on the replacement records for corrections, for as many steps as
  a stopping rule that does not look at the gold asks (``done()``, checked every ``eval_every`` steps,
  untimed; the benchmark stops a removal once the forgotten records' NLL reaches never-seen records').
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from eraser.curvature import flatten, gradient_sum, lora_parameters
from eraser.records import IGNORE_INDEX, Record, collate, record_losses
from eraser.requests import Edit
from eraser.update import lora_vector


@dataclass
class BaselineResult:
    theta: torch.Tensor  # (p,) the LoRA vector the baseline ends with
    wall_time_s: float
    cpu_time_s: float
    info: dict = field(default_factory=dict)


def _set_lora(model, theta: torch.Tensor) -> None:
    from benchmarks.tofu_setup import set_lora

    set_lora(model, theta)


def paper_code_update(model, tokenizer, records: Sequence[Record], edits: Sequence[Edit], *, iters: int = 20,
                      lr: float = 1e-5, x_init: float = 1e-6, weight_decay: float = 1e-5, x_batch: int = 1,
                      seed: int = 1234) -> BaselineResult:
    """The public code's update (see module docstring). ``model`` holds the original adapter; it is left
    holding ``theta + x``."""
    started, cpu_started = time.perf_counter(), time.process_time()
    params = lora_parameters(model)
    model.eval()  # LoRA dropout is 0 in this recipe: train() and eval() compute the same loss
    before = [edit.old for edit in edits]
    after = [edit.new for edit in edits if edit.new is not None]
    grad_before = sum((gradient_sum(model, params, collate([r], tokenizer)) for r in before),
                      torch.zeros(sum(p.numel() for p in params)))
    grad_after = sum((gradient_sum(model, params, collate([r], tokenizer)) for r in after),
                     torch.zeros_like(grad_before))
    b = (grad_after - grad_before) / len(records)  # get_vector_b: (after - before) / len(trainset)
    x = torch.nn.Parameter(torch.full_like(b, x_init))
    optimizer = torch.optim.Adam([x], lr=lr, weight_decay=weight_decay)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    for step in range(iters):
        start = (step * x_batch) % max(1, len(order) - x_batch + 1)
        batch = collate([records[i] for i in order[start : start + x_batch]], tokenizer)
        loss = record_losses(model, batch).mean()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        flat_grads = flatten(grads)
        hvp = flatten(torch.autograd.grad(flat_grads, params, grad_outputs=x.detach()))  # detached from x
        objective = 0.5 * torch.dot(x, hvp) - torch.dot(b, x)
        optimizer.zero_grad()
        objective.backward()
        optimizer.step()
    theta = lora_vector(model) + x.detach()
    _set_lora(model, theta)
    return BaselineResult(theta=theta, wall_time_s=time.perf_counter() - started,
                          cpu_time_s=time.process_time() - cpu_started, info={"iters": iters, "lr": lr, "x_init": x_init, "weight_decay": weight_decay,
                                "x_batch": x_batch, "step_norm": float(x.detach().norm()), "b_norm": float(b.norm())})


def sequence_nll(model, batch) -> torch.Tensor:
    """Summed NLL of each record's response tokens (B,): ``-log pi(response | prompt)``."""
    counts = (batch.labels[:, 1:] != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return record_losses(model, batch) * counts


def _unlearning_loop(model, tokenizer, edits: Sequence[Edit], forget_loss: Callable[[Sequence[Record]], torch.Tensor],
                     *, steps: int, lr: float, batch_size: int, eval_every: int, done: Callable[[], bool],
                     seed: int, extra: dict | None = None) -> BaselineResult:
    """Adam on ``forget_loss(old records) + mean NLL(their replacements)`` over minibatches of the edited
    records, until ``done()`` (checked every ``eval_every`` steps, untimed) or ``steps`` steps."""
    params = lora_parameters(model)
    optimizer = torch.optim.Adam(params, lr=lr)
    rng = random.Random(seed)
    trained = trained_cpu = 0.0
    chosen = steps
    for step in range(1, steps + 1):
        started, cpu_started = time.perf_counter(), time.process_time()
        chunk = [edits[i] for i in rng.sample(range(len(edits)), min(batch_size, len(edits)))]
        loss = forget_loss([edit.old for edit in chunk])
        replacements = [edit.new for edit in chunk if edit.new is not None]
        if replacements:
            loss = loss + record_losses(model, collate(replacements, tokenizer)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        trained += time.perf_counter() - started
        trained_cpu += time.process_time() - cpu_started
        if step % eval_every == 0 and done():
            chosen = step
            break
    return BaselineResult(theta=lora_vector(model), wall_time_s=trained, cpu_time_s=trained_cpu,
                          info={"steps_chosen": chosen, "steps_max": steps, "stopped": chosen < steps, "lr": lr,
                                "batch_size": batch_size, **(extra or {})})


def gradient_ascent(model, tokenizer, edits: Sequence[Edit], *, done: Callable[[], bool], steps: int = 60,
                    lr: float = 1e-3, batch_size: int = 8, eval_every: int = 5, seed: int = 0) -> BaselineResult:
    """Gradient ascent on the forgotten records' NLL (plus descent on replacements) until ``done()``."""
    model.eval()
    return _unlearning_loop(model, tokenizer, edits,
                            lambda old: -record_losses(model, collate(old, tokenizer)).mean(),
                            steps=steps, lr=lr, batch_size=batch_size, eval_every=eval_every, done=done, seed=seed)


def npo(model, tokenizer, edits: Sequence[Edit], *, done: Callable[[], bool], beta: float = 0.1, steps: int = 60,
        lr: float = 1e-3, batch_size: int = 8, eval_every: int = 5, seed: int = 0) -> BaselineResult:
    """Negative preference optimisation (Zhang et al., 2024): ``(2/beta) log(1 + (pi/pi_ref)^beta)`` on the
    forgotten records' sequence likelihoods, the original adapter as reference; until ``done()``."""
    model.eval()
    old = [edit.old for edit in edits]
    with torch.no_grad():
        reference = {}
        for start in range(0, len(old), 32):
            chunk = old[start : start + 32]
            reference.update((r.id, float(v)) for r, v in zip(chunk, sequence_nll(model, collate(chunk, tokenizer))))

    def loss(records: Sequence[Record]) -> torch.Tensor:
        nll = sequence_nll(model, collate(records, tokenizer))  # (B,)
        ref = torch.tensor([reference[r.id] for r in records], dtype=nll.dtype)
        log_ratio = ref - nll  # log pi_theta - log pi_ref
        return (2.0 / beta * torch.nn.functional.softplus(beta * log_ratio)).mean()

    return _unlearning_loop(model, tokenizer, edits, loss, steps=steps, lr=lr, batch_size=batch_size,
                            eval_every=eval_every, done=done, seed=seed, extra={"beta": beta})
