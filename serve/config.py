"""Serving options: one pydantic model per concern, ``extra="forbid"``, a description per field.

Every default can be overridden from the environment (``ERASER_SERVE_<FIELD>``, nested fields with
``__``: ``ERASER_SERVE_ENGINE__MAX_LORAS=8``) or from the Serve config YAML's ``args`` (see
``serve/serve_config.yaml``); explicit values win over the environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# vLLM's allowed ``max_lora_rank`` values (vllm.config.lora.MaxLoRARanks).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_ADAPTER_DIR = Path("~/.cache/eraser/serve-adapters")


class EngineConfig(BaseModel):
    """The vLLM engine of one replica: base model, LoRA slots, memory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(
        "",
        description="base model: a local Hugging Face directory, or a model name in the tenant store "
        "(downloaded once per replica); '' = the base model of the first tenant found",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="weights and activations dtype (float32 on CPU keeps vLLM equal to HF/PEFT)"
    )
    max_model_len: int | None = Field(None, ge=16, description="token limit of prompt + completion; None = the model's")
    max_num_seqs: int = Field(64, ge=1, description="sequences batched together per engine step")
    max_loras: int = Field(4, ge=1, description="adapters usable in one batch (GPU/CPU LoRA slots)")
    max_cpu_loras: int = Field(16, ge=1, description="adapters kept loaded in host memory (LRU beyond that)")
    max_lora_rank: int = Field(16, description=f"largest LoRA rank served; one of {LORA_RANKS}")
    kv_cache_space_gib: float = Field(
        1.0, gt=0, description="CPU KV cache size in GiB (sets VLLM_CPU_KVCACHE_SPACE; vLLM's default asks 92% of RAM)"
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="share of GPU memory vLLM may use (GPU hosts)")
    enforce_eager: bool = Field(True, description="no graph capture / torch.compile (fast start, required on CPU here)")
    seed: int = Field(0, description="engine seed for sampled (temperature > 0) requests without their own seed")

    @field_validator("max_lora_rank")
    @classmethod
    def _rank(cls, value: int) -> int:
        if value not in LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {LORA_RANKS}, got {value}")
        return value

    @model_validator(mode="after")
    def _slots(self) -> "EngineConfig":
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        return self
