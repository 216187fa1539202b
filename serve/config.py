"""Serving options: one pydantic model per concern, ``extra="forbid"``, a description per field.

Every default can be overridden from the environment (``ERASER_SERVE_<FIELD>``, nested fields with
``__``: ``ERASER_SERVE_ENGINE__MAX_LORAS=8``; ``null`` is None) or from the Serve config YAML's ``args`` (see
``serve/serve_config.yaml``); explicit values win over the environment.
"""

from __future__ import annotations

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


class AutoscalingConfig(BaseModel):
    """Ray Serve autoscaling of the engine deployment (one vLLM engine per replica)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int = Field(1, ge=0, description="replicas kept when idle")
    max_replicas: int = Field(2, ge=1, description="replicas at most (each holds a full base model)")
    target_ongoing_requests: float = Field(16, gt=0, description="requests in flight per replica Serve aims for")

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingConfig":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        return self


class ServeConfig(BaseSettings):
    """Everything the Serve application needs. Build one with :meth:`from_args` or :meth:`from_file`."""

    model_config = SettingsConfigDict(
        env_prefix="ERASER_SERVE_", env_nested_delimiter="__", extra="forbid", frozen=True,
        env_parse_none_str="null",  # ERASER_SERVE_TENANT_TOKENS_PER_MINUTE=null: no limit
    )

    app_name: str = Field("eraser", min_length=1, description="Serve application name (deployments are found by it)")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="the vLLM engine of each replica")
    store: dict[str, Any] = Field(
        default_factory=dict,
        description="tenant store settings (tenants.StoreSettings fields); unset fields come from ERASER_S3_*",
    )
    engine_replicas: int = Field(1, ge=1, description="engine replicas when autoscaling is off")
    autoscaling: AutoscalingConfig | None = Field(None, description="engine autoscaling; None = fixed engine_replicas")
    ingress_replicas: int = Field(1, ge=1, description="HTTP ingress replicas")
    engine_num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves per engine replica")
    ingress_num_cpus: float = Field(0.25, ge=0, description="CPUs Ray reserves per ingress replica")
    max_ongoing_requests: int = Field(64, ge=1, description="requests in flight per engine replica before queueing")
    refresh_interval_s: float = Field(
        5.0, ge=0, description="each engine replica re-reads the HEAD of the tenants it holds this often (0 = never)"
    )
    adapter_idle_s: float | None = Field(
        900.0, gt=0, description="an engine replica forgets a tenant no request used for this long: its adapter "
        "leaves the engine and the replica's disk, and HEAD is no longer polled for it (the next request loads "
        "HEAD again); None = never forget (a replica then polls every tenant it ever served)"
    )
    switch_timeout_s: float = Field(
        120.0, gt=0, description="how long a refresh waits for every replica to drop the old adapter version"
    )
    adapter_dir: Path = Field(
        DEFAULT_ADAPTER_DIR, description="local adapter copies, one subdirectory per replica (a version's files are "
        "deleted when superseded, a replica's directory when it stops or, if it died, when the next one starts)"
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest request body accepted (413 beyond)")
    max_upload_bytes: int = Field(
        256 << 20, ge=1024, description="largest records upload accepted on the admin route (413 beyond)"
    )
    max_tokens_limit: int = Field(1024, ge=1, description="largest max_tokens a request may ask for")
    max_concurrent_per_tenant: int = Field(
        16, ge=1, description="generations one tenant may have in flight per ingress replica (429 beyond), so one "
        "tenant cannot fill every engine replica's queue (max_ongoing_requests) for the others"
    )
    tenant_tokens_per_minute: int | None = Field(
        100_000, ge=1, description="prompt + completion tokens one tenant may use per minute per ingress replica "
        "(a token bucket of this size refilling continuously): a generation reserves its worst case (max_tokens "
        "plus the prompt's UTF-8 bytes or token ids) and is refunded what it did not use; 429 with Retry-After "
        "when the bucket cannot cover it, 400 when it exceeds the whole budget; None = no limit"
    )
    max_erasure_ids: int = Field(
        10_000, ge=1, description="most record ids (or subjects) one erasure request may select (400 beyond)"
    )
    auth_cache_s: float = Field(
        30.0, ge=0, description="a verified API key is trusted this long before it is checked again (a revocation "
        "through the admin route reaches every ingress replica at once; one made elsewhere waits this long)"
    )
    auth_negative_cache_s: float = Field(
        60.0, ge=0, description="a key that failed verification is refused this long without another S3 read and scrypt"
    )
    auth_failures_per_minute: int = Field(
        20, ge=1, description="failed API key attempts one client address may make per minute; beyond, keys not "
        "already trusted get 429 without being checked"
    )
    erasure_backend: str | None = Field(
        None,
        description="'module:factory' building the ErasureBackend that executes erasures and training "
        "(serve.backend.BackendContext -> ErasureBackend); None = record requests only (they stay pending)",
    )

    @field_validator("adapter_dir")
    @classmethod
    def _adapter_dir(cls, value: Path) -> Path:
        return Path(value).expanduser()

    @field_validator("erasure_backend")
    @classmethod
    def _backend(cls, value: str | None) -> str | None:
        if value and ":" not in value:
            raise ValueError(f"erasure_backend must look like 'package.module:factory', got {value!r}")
        return value or None

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> "ServeConfig":
        """From a Serve application's ``args`` (explicit values win over ERASER_SERVE_* variables)."""
        return cls(**(args or {}))

    @classmethod
    def from_file(cls, path: str | Path) -> "ServeConfig":
        """From a YAML file holding these fields (or a Serve config whose first application's ``args`` do)."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        if "applications" in data:
            data = (data["applications"] or [{}])[0].get("args") or {}
        return cls.from_args(data)

    def store_settings(self, **overrides: Any):
        """The tenant store settings: ``store`` over ERASER_S3_* over the defaults."""
        from tenants.settings import StoreSettings

        return StoreSettings(**{**self.store, **overrides})
