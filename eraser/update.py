"""Apply an influence step to the adapter's weights and save it as a PEFT directory + ``eraser.json``."""

from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import torch

from eraser.curvature import flatten, lora_parameters, unflatten
from eraser.errors import SolverDivergedError

MANIFEST_NAME = "eraser.json"
WEIGHTS_NAME = "adapter_model.safetensors"


@torch.no_grad()
def apply_step(model, step: torch.Tensor) -> None:
    """``theta <- theta + step`` over the LoRA parameters (in the order of ``lora_parameters``)."""
    if not torch.isfinite(step).all():
        raise SolverDivergedError("refusing to apply a non-finite update to the adapter")
    params = lora_parameters(model)
    for p, delta in zip(params, unflatten(step.to(params[0].dtype), params)):
        p.add_(delta)


@torch.no_grad()
def lora_vector(model) -> torch.Tensor:
    """The adapter's LoRA parameters as one flat vector (a copy)."""
    return flatten([p.detach() for p in lora_parameters(model)]).clone()


@torch.no_grad()
def set_lora_vector(model, vector: torch.Tensor) -> None:
    """Set the LoRA parameters to ``vector`` exactly (bitwise: a cached curvature is fingerprinted by them);
    the inverse of :func:`lora_vector`."""
    params = lora_parameters(model)
    for p, value in zip(params, unflatten(vector.to(params[0].dtype), params)):
        p.copy_(value)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def json_safe(value, drop_tensors: bool = False):
    """``value`` as strict JSON takes it: non-finite floats -> None, numpy scalars -> Python numbers, and with
    ``drop_tensors`` torch objects -> None (else ``json.dumps``' ``default`` sees them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v, drop_tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, drop_tensors) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0 and type(value).__module__ == "numpy":
        return json_safe(value.item(), drop_tensors)
    if drop_tensors and type(value).__module__.startswith("torch"):
        return None
    return value


def save_adapter(model, out_dir: str | Path, manifest: dict | None = None) -> Path:
    """Save the PEFT adapter and write ``eraser.json`` (docs/architecture.md#s3-layout) next to it.

    Writes into ``out_dir`` only when every tensor is finite; the manifest is written last and
    carries the sha256 of every file, so a reader can tell a complete directory from a partial one.
    """
    for p in lora_parameters(model):
        if not torch.isfinite(p).all():
            raise SolverDivergedError("adapter has non-finite weights; not saving")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    files = {f.name: sha256_file(f) for f in sorted(out.iterdir()) if f.is_file() and f.name != MANIFEST_NAME}
    body = {
        "created_at": datetime.now(timezone.utc).isoformat(),
        "sha256": files.get(WEIGHTS_NAME),
        "files": files,
        **(manifest or {}),
    }
    (out / MANIFEST_NAME).write_text(json.dumps(json_safe(body), indent=2, default=str))
    return out


def read_manifest(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / MANIFEST_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def relative_distance(theta: torch.Tensor, theta_gold: torch.Tensor, theta_orig: torch.Tensor) -> float:
    """``||theta - theta_gold|| / ||theta_orig - theta_gold||``: 0 = the gold, 1 = no progress."""
    denominator = float((theta_orig - theta_gold).norm())
    return float((theta - theta_gold).norm()) / max(denominator, 1e-30)


def parameter_names(model) -> Sequence[str]:
    return sorted(name for name, _ in model.named_parameters() if "lora_" in name)
