"""What an import of a tenant with an adapter trained elsewhere accepts: the adapter directory's files,
the LoRA shape its ``adapter_config.json`` can say, and the tenant config built from it and a recipe."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tenants.errors import InvalidConfigError, InvalidAdapterError
from tenants.models import LoraRecipe, Record, TenantConfig, TrainingRecipe
from tenants.paths import ADAPTER_MANIFEST, validate_relative_file
from tenants.s3io import local_files
from tenants.store.base import CLAIM_FILE


ADAPTER_REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")
# ImportCheck(config, adapter_dir, records) -> evidence for eraser.json: whatever must hold before an
# imported tenant is written that the store cannot see (the adapter fits its base: the cluster layer).
ImportCheck = Callable[[TenantConfig, Path, list[Record]], dict[str, Any]]
# The recipe fields an import decides itself, and the ones that make a recipe a training recipe.
IMPORT_DECIDES = ("heldout_unit", "heldout_fraction", "reproducible")
TRAINING_FIELDS = ("epochs", "lr", "batch_size")
# adapter_config.json fields a LoraRecipe (one rank, one alpha, module names on every layer) cannot say.
UNDESCRIBED_LORA_FIELDS = ("rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "exclude_modules")
def adapter_files(local_dir: Path) -> list[str]:
    """The files of a PEFT adapter directory to upload (InvalidAdapterError if it lacks config or weights)."""
    if not local_dir.is_dir():
        raise InvalidAdapterError(f"adapter directory {str(local_dir)!r} does not exist")
    missing = [name for name in ADAPTER_REQUIRED_FILES if not (local_dir / name).is_file()]
    if missing:
        raise InvalidAdapterError(f"adapter directory {str(local_dir)!r} lacks {missing}")
    names = local_files(local_dir, skip={ADAPTER_MANIFEST, CLAIM_FILE})
    for name in names:
        validate_relative_file(name)
    return names


def lora_from_peft_config(peft_config: dict[str, Any]) -> LoraRecipe:
    """The tenant's LoRA shape read from an adapter's ``adapter_config.json``. Refused: what one rank,
    alpha and module list cannot say (per-module ranks or alphas, some layers only, a module pattern
    instead of names), because the tenant's recipe, and the retrain built from it, must describe the
    adapter exactly. Other PEFT features are the method's to refuse when it loads the adapter."""
    where = "adapter_config.json"
    if peft_config.get("peft_type") not in (None, "LORA"):
        raise InvalidAdapterError(f"{where}: peft_type {peft_config.get('peft_type')!r} is not LoRA")
    for field in ("r", "lora_alpha", "target_modules"):
        if peft_config.get(field) is None:
            raise InvalidAdapterError(f"{where}: {field!r} is missing")
    modules = peft_config["target_modules"]
    if isinstance(modules, str):
        raise InvalidAdapterError(f"{where}: target_modules is a pattern ({modules!r}); a list of module names "
                                  "is needed (PEFT saves one for adapters it built from a list or 'all-linear')")
    for field in UNDESCRIBED_LORA_FIELDS:
        if peft_config.get(field):
            raise InvalidAdapterError(f"{where}: {field} {peft_config[field]!r} is not supported: the tenant's LoRA "
                                      "recipe is one rank and one alpha on every layer's target modules")
    try:
        return LoraRecipe(rank=peft_config["r"], alpha=peft_config["lora_alpha"],
                          dropout=peft_config.get("lora_dropout") or 0.0, target_modules=sorted(modules),
                          use_rslora=bool(peft_config.get("use_rslora", False)))
    except ValidationError as error:
        first = error.errors()[0]
        raise InvalidAdapterError(f"{where}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def imported_config(name: str, base_model: str, peft_config: dict[str, Any],
                    recipe: dict[str, Any] | None = None) -> TenantConfig:
    """``tenant.json`` of an imported tenant: the LoRA shape from the adapter's config, the reference given
    (``heldout_unit`` "given"), and the recipe if one was given. A recipe naming epochs, lr and batch_size
    is the one that trained the adapter: the exact-retrain fallback uses it. One with only rendering fields
    (max_length, chat_template) or none at all leaves the tenant ``reproducible: false``."""
    recipe = dict(recipe or {})
    decided = sorted(set(recipe) & set(IMPORT_DECIDES))
    if decided:
        raise InvalidConfigError(f"recipe: {decided} cannot be set for an import: the reference records are given")
    if "lora" in recipe:
        raise InvalidConfigError("recipe: 'lora' cannot be set: the LoRA shape is read from adapter_config.json")
    named = [field for field in TRAINING_FIELDS if field in recipe]
    if named and len(named) != len(TRAINING_FIELDS):
        missing = [field for field in TRAINING_FIELDS if field not in recipe]
        raise InvalidConfigError(f"recipe: a training recipe names {list(TRAINING_FIELDS)}; missing {missing} "
                                 "(give only max_length/chat_template when the training recipe is unknown)")
    try:
        training = TrainingRecipe(**recipe, heldout_unit="given", reproducible=bool(named))
        return TenantConfig(name=name, base_model=base_model, lora=lora_from_peft_config(peft_config), training=training)
    except (ValidationError, TypeError) as error:
        detail = (f"{'.'.join(map(str, error.errors()[0]['loc']))}: {error.errors()[0]['msg']}"
                  if isinstance(error, ValidationError) else str(error))
        raise InvalidConfigError(f"recipe: {detail}") from None
