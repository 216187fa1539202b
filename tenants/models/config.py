"""A tenant's configuration (``tenant.json``): its LoRA shape, training recipe and API key hashes."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from tenants.models.base import TenantName, _Model, utcnow


DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraRecipe(_Model):
    """The LoRA shape of a tenant's adapter."""

    rank: int = Field(8, ge=1, le=1024, description="LoRA rank r")
    alpha: float = Field(16, gt=0, description="LoRA alpha (scale = alpha / rank)")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout during training (off for HVPs)")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES), min_length=1, description="module names LoRA wraps"
    )
    use_rslora: bool = Field(False, description="rank-stabilised scaling alpha / sqrt(rank) (an imported adapter's "
                             "own; the service's retrain builds plain LoRA, so it cannot retrain such an adapter)")


class TrainingRecipe(_Model):
    """How a tenant's adapter is trained (onboarding and the exact-retrain fallback)."""

    epochs: int = Field(3, ge=1, description="passes over the training split")
    lr: float = Field(2e-4, gt=0, description="learning rate")
    batch_size: int = Field(8, ge=1, description="records per optimiser step")
    seed: int = Field(0, description="seed for shuffling, the held-out split and initialisation")
    heldout_fraction: float = Field(
        0.1, ge=0, lt=1, description="share of records never trained on (membership-test reference)"
    )
    heldout_unit: Literal["mixed", "record", "given"] = Field(
        "mixed", description="mixed: half the held-out share is whole subjects (the reference for erasing a "
        "subject), half single records of the others (for erasing single records); record: every record by "
        "itself (tenants onboarded before subjects were held out whole); given: the records flagged 'heldout' "
        "(an imported adapter's reference; heldout_fraction is not used)")
    max_length: int = Field(512, ge=8, description="token limit of a rendered record (longer ones lose their "
                            "oldest tokens); training, the method, verification and the retrain all cut there")
    chat_template: str | None = Field(
        None, min_length=1, description="Jinja chat template records are rendered with; None: the base "
        "tokenizer's own (the built-in 'Question: ... Answer:' format for a base without one)")
    reproducible: bool = Field(
        True, description="False: the adapter was imported without the recipe that trained it; no exact-retrain "
        "fallback (an erasure the influence update and remediation cannot make pass fails instead)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the tenant's jobs compute: auto (the GPU a worker was given, else the CPU), "
        "cpu, or cuda (a job on a worker without a GPU fails)")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="precision of the base model's weights in the tenant's jobs; LoRA factors, "
        "gradients, the curvature and solver vectors stay float32")
    curvature_budget_mib: float | None = Field(
        None, gt=0, description="memory for the adapter's cached curvature and for building it, MiB (its rank "
        "and samples are cut to fit); None: the service's (SolveConfig.cache_budget_mib, 2048)")


class KeyHash(_Model):
    """A tenant API key as stored: a salted scrypt hash, never the key."""

    key_id: str = Field(description="public identifier embedded in the key (selects this hash)")
    salt: str = Field(description="random salt, hex")
    hash: str = Field(description="scrypt(key, salt), hex")
    algorithm: Literal["scrypt"] = Field("scrypt", description="key derivation function")
    n: int = Field(2**14, description="scrypt cost parameter N")
    r: int = Field(8, description="scrypt block size r")
    p: int = Field(1, description="scrypt parallelism p")
    label: str | None = Field(None, description="free-form note (who or what uses the key)")
    created_at: datetime = Field(default_factory=utcnow, description="when it was issued")


class TenantConfig(_Model):
    """``tenant.json``: the base model, LoRA and training recipe, and API key hashes of a tenant."""

    name: TenantName = Field(description="tenant name (lowercase letters, digits, '-')")
    base_model: str = Field(min_length=1, description="model name under models/, an s3:// URI or a local path")
    lora: LoraRecipe = Field(default_factory=LoraRecipe, description="LoRA shape")
    training: TrainingRecipe = Field(default_factory=TrainingRecipe, description="training recipe")
    key_hashes: list[KeyHash] = Field(default_factory=list, description="hashes of the tenant's API keys")
    created_at: datetime = Field(default_factory=utcnow, description="when the tenant was created")

    def retrain_unavailable(self) -> str | None:
        """Why the exact-retrain fallback cannot run for this tenant, for receipts and manifests; None: it can."""
        if not self.training.reproducible:
            return "unavailable: imported without a training recipe"
        if self.lora.use_rslora:
            return "unavailable: the adapter uses rsLoRA scaling, which the service's retrain does not build"
        return None

    def public(self) -> dict[str, Any]:
        """The config without key hashes (for display)."""
        data = self.model_dump(mode="json", exclude={"key_hashes"})
        data["keys"] = [
            {"key_id": k.key_id, "label": k.label, "created_at": k.created_at.isoformat()} for k in self.key_hashes
        ]
        return data
