"""The benchmark's models, built locally and cached on disk: the pretrained base and every LoRA adapter
(the tenant's original, the gold retrains, the other-seed retrains), keyed by what produced them.

A cached adapter keeps the wall time its training took when it was trained (``train.json``): retrain
times reported from the cache are those measurements, marked ``cached``; ``--fresh`` retrains.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from eraser.model import (BaseModelConfig, build_base_model, load_adapter, load_base, load_tokenizer, save_base_model,
                          train_tokenizer)
from eraser.records import Record
from eraser.training import TrainConfig, add_lora, pretrain_base, train_lora
from eraser.update import lora_vector, save_adapter, set_lora_vector

from benchmarks.tofu_data import TofuRow, pretraining_authors, pretraining_texts

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseRecipe:
    """The small Llama base and its pretraining on TOFU authors no tenant of the benchmark holds."""

    model: BaseModelConfig = field(default_factory=BaseModelConfig)
    pretrain_authors: int = 80  # authors 0..79: 1,600 rows
    pretrain_steps: int = 600
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 16
    seed: int = 0

    def key(self) -> str:
        return _digest({"recipe": asdict(self), "format": 1})


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def records_digest(records: Sequence[Record]) -> str:
    digest = hashlib.sha256()
    for r in records:
        digest.update(json.dumps([r.id, r.subject, r.prompt, r.response]).encode())
    return digest.hexdigest()[:16]


def ensure_base(recipe: BaseRecipe, rows: Sequence[TofuRow], cache_dir: Path, fresh: bool = False) -> tuple[Path, dict]:
    """The pretrained base (HF directory with its tokenizer), built and pretrained on first use."""
    out = cache_dir / f"base-{recipe.key()}"
    info_file = out / "eraser_base.json"
    if info_file.is_file() and not fresh:
        info = json.loads(info_file.read_text())
        info["cached"] = True
        return out, info
    texts = pretraining_texts(rows, pretraining_authors(recipe.pretrain_authors))
    started, cpu_started = time.perf_counter(), time.process_time()
    tokenizer = train_tokenizer(texts, vocab_size=recipe.model.vocab_size)
    model = build_base_model(recipe.model, tokenizer, seed=recipe.seed)
    report = pretrain_base(model, tokenizer, texts, steps=recipe.pretrain_steps, lr=recipe.pretrain_lr,
                           batch_size=recipe.pretrain_batch, seed=recipe.seed)
    return save_pretrained_base(model, tokenizer, out, report, started, cpu_started,
                                {"recipe": asdict(recipe), "texts": len(texts)})


def save_pretrained_base(model, tokenizer, out: Path, report, started: float, cpu_started: float,
                         info: dict) -> tuple[Path, dict]:
    """Save a base just pretrained (``report``; ``started``/``cpu_started``: wall and process clocks when
    its build began) with ``info`` plus its losses and times, and say so: ``(out, info)``."""
    info = {**info, "pretrain_loss_first": report.loss_history[0], "pretrain_final_loss": report.final_loss,
            "wall_time_s": time.perf_counter() - started, "cpu_time_s": time.process_time() - cpu_started,
            "threads": torch.get_num_threads(), "created_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    save_base_atomically(model, tokenizer, out, info)
    logger.info("pretrained base %s: loss %.3f -> %.3f in %.0fs", out.name, report.loss_history[0],
                report.final_loss, info["wall_time_s"])
    info["cached"] = False
    return out, info


def save_base_atomically(model, tokenizer, out: Path, info: dict) -> None:
    """Write the base next to ``out`` and rename it into place: a cache entry is whole or absent."""
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    save_base_model(model, tokenizer, staging, info)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


class Workbench:
    """The base directory, its tokenizer, and the adapter cache; makes PEFT models and trains adapters."""

    def __init__(self, base_dir: Path, recipe: TrainConfig, cache_dir: Path, fresh: bool = False):
        self.base_dir = base_dir
        self.recipe = recipe
        self.cache_dir = cache_dir / "adapters"
        self.fresh = fresh
        self.tokenizer = load_tokenizer(base_dir)
        self.trained_this_run: set[Path] = set()

    def peft_model(self):
        """A PEFT model of the base with an (untrained) adapter of the recipe's shape, eval mode."""
        return add_lora(load_base(self.base_dir), self.recipe).eval()

    def adapter(self, records: Sequence[Record], recipe: TrainConfig | None = None) -> tuple[torch.Tensor, dict]:
        """The LoRA vector trained on ``records`` with ``recipe`` (cached) and its training report."""
        recipe = recipe or self.recipe
        key = _digest({"base": self.base_dir.name, "recipe": recipe.to_dict(), "records": records_digest(records)})
        out = self.cache_dir / key
        report_file = out / "train.json"
        if report_file.is_file() and (not self.fresh or out in self.trained_this_run):
            info = json.loads(report_file.read_text())
            model = load_adapter(load_base(self.base_dir), out)
            info["cached"] = out not in self.trained_this_run
            return lora_vector(model), info
        model = add_lora(load_base(self.base_dir), recipe)
        cpu_started = time.process_time()
        report = train_lora(model, self.tokenizer, records, recipe)
        info = {"wall_time_s": report.wall_time_s, "cpu_time_s": time.process_time() - cpu_started,
                "final_loss": report.final_loss, "steps": report.steps,
                "records": report.records, "seed": recipe.seed, "threads": torch.get_num_threads(),
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        staging = out.with_name(out.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        save_adapter(model, staging, {"recipe": recipe.to_dict(), "training": info})
        (staging / "train.json").write_text(json.dumps(info, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
        self.trained_this_run.add(out)
        info["cached"] = False
        return lora_vector(model), info


def set_lora(model, theta: torch.Tensor) -> None:
    """Load the flat LoRA vector ``theta`` (order of :func:`eraser.curvature.lora_parameters`) into ``model``."""
    set_lora_vector(model, theta)
