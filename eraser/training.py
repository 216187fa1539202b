"""LoRA training, deterministic for a seed: onboarding a tenant and the retrained "gold" adapter.

It minimises the same loss the influence system differentiates (:func:`eraser.records.record_losses`),
so the gold adapter and the erased adapter answer the same question.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from eraser.devices import model_device
from eraser.errors import AdapterMismatchError, EraserError, require_counts
from eraser.records import Record, collate, record_losses

logger = logging.getLogger(__name__)

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainConfig:
    """The LoRA training recipe (the tenant's, and the gold retrain's). How records become tokens (the
    chat template, the token limit) is the tokenizer's: :mod:`eraser.rendering`."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ALL_LINEAR
    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 8
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        require_counts(self, ("rank", "epochs", "batch_size"))
        if not self.lr > 0:
            raise EraserError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.dropout < 1:
            raise EraserError(f"dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainReport:
    steps: int = 0
    epochs: int = 0
    records: int = 0
    final_loss: float = float("nan")
    wall_time_s: float = 0.0
    loss_history: list[float] = field(default_factory=list)


def add_lora(base_model, config: TrainConfig):
    """Wrap a base model with a fresh LoRA adapter (PEFT), initialised from ``config.seed``."""
    from peft import LoraConfig, get_peft_model

    from eraser.model import MODEL_CONSTRUCTION

    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        task_type="CAUSAL_LM",
        bias="none",
    )
    with MODEL_CONSTRUCTION:  # the seed is process-wide, and torch's init functions too (eraser.model)
        torch.manual_seed(config.seed)
        return get_peft_model(base_model, lora)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 7919 + epoch).shuffle(order)
    return order


def train_lora(
    model,
    tokenizer,
    records: Sequence[Record],
    config: TrainConfig,
    progress: Callable[[int, int, float], None] | None = None,
) -> TrainReport:
    """Train the LoRA parameters of a PEFT ``model`` in place with AdamW on the mean record loss."""
    if not records:
        raise EraserError("no training records")
    torch.manual_seed(config.seed)
    params = [p for name, p in model.named_parameters() if "lora_" in name]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = (len(records) + config.batch_size - 1) // config.batch_size
    total = steps_per_epoch * config.epochs
    report = TrainReport(records=len(records))
    started = time.perf_counter()
    model.train()
    for epoch in range(config.epochs):
        order = epoch_order(len(records), config.seed, epoch)
        for start in range(0, len(order), config.batch_size):
            chunk = [records[i] for i in order[start : start + config.batch_size]]
            loss = record_losses(model, collate(chunk, tokenizer)).mean()
            if not torch.isfinite(loss):
                raise EraserError(f"training loss became non-finite at step {report.steps} (lower --lr)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            report.steps += 1
            report.loss_history.append(loss.item())
            if progress:
                progress(report.steps, total, report.loss_history[-1])
        report.epochs = epoch + 1
    model.eval()
    report.final_loss = report.loss_history[-1]
    report.wall_time_s = time.perf_counter() - started
    logger.info("trained LoRA on %d records: %d steps, final loss %.4f, %.1fs",
                len(records), report.steps, report.final_loss, report.wall_time_s)
    return report


def pretrain_base(
    model,
    tokenizer,
    texts: Sequence[str],
    steps: int,
    lr: float = 3e-3,
    batch_size: int = 16,
    seed: int = 0,
    max_length: int = 128,
    progress: Callable[[int, int, float], None] | None = None,
) -> TrainReport:
    """Full-parameter causal-LM pretraining of the small base on generic ``texts``, so that a LoRA
    adapter on top is a small adaptation, as in production (not a model learning language from zero)."""
    if not texts:
        raise EraserError("no pretraining texts")
    torch.manual_seed(seed)
    device = model_device(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    report = TrainReport(records=len(texts))
    started = time.perf_counter()
    model.train()
    for step in range(steps):
        chunk = [texts[rng.randrange(len(texts))] for _ in range(batch_size)]
        encoded = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        encoded = {key: value.to(device) for key, value in encoded.items()}
        labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
        loss = model(**encoded, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        report.steps += 1
        report.loss_history.append(loss.item())
        if progress:
            progress(step + 1, steps, report.loss_history[-1])
    model.eval()
    report.final_loss = report.loss_history[-1]
    report.wall_time_s = time.perf_counter() - started
    return report


def retrain_adapter(model, tokenizer, records_after: Sequence[Record], recipe: TrainConfig,
                    base_factory: Callable[[], torch.nn.Module] | None = None) -> TrainReport:
    """Exact retrain: ``train_lora`` on a fresh ``add_lora`` of the base; weights copied into ``model``."""
    base = base_factory() if base_factory is not None else copy.deepcopy(model).unload()
    fresh = add_lora(base, recipe)
    report = train_lora(fresh, tokenizer, records_after, recipe)
    source = {name: p for name, p in fresh.named_parameters() if "lora_" in name}
    target = {name: p for name, p in model.named_parameters() if "lora_" in name}
    if sorted(source) != sorted(target) or any(source[n].shape != target[n].shape for n in target):
        raise AdapterMismatchError("the recipe's LoRA layout (rank, target modules) differs from the adapter's; "
                                   "retrain with the adapter's own recipe")
    with torch.no_grad():
        for name, p in target.items():
            p.copy_(source[name])
    model.eval()
    return report
