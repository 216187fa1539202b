"""Where the method computes and in what precision: the model's device and dtype decide.

Every tensor the method makes (batches, accumulators, solver vectors, random draws, the cached
curvature) is created on :func:`model_device`; random numbers are drawn on the CPU from seeded
generators and moved there, so a seed gives the same draws on every device. The base may be held in
bfloat16 or float16 (half the memory, the tensor cores' format); what the method sums and solves is
kept in :func:`accumulation_dtype` (float32 for a half-precision model, the model's own otherwise, so
float64 checks stay float64): gradients, HVP sums, the curvature factor and its eigendecomposition,
solver vectors. PEFT keeps LoRA factors in float32 on a half-precision base (``autocast_adapter_dtype``).
"""

from __future__ import annotations

import re

import torch

from eraser.errors import EraserError

# Names the CLI and the tenant's recipe use (strings: the tenant layer knows no torch).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
HALF_DTYPES = (torch.bfloat16, torch.float16)
_DEVICE = re.compile(r"^(cpu|meta|cuda(:\d+)?)$")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (a torch dtype is returned as is)."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise EraserError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def parse_device(name: str | torch.device | None) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` (or ``meta``) as a torch device; a CUDA device this process cannot
    use is refused here, by name, rather than by the first tensor sent to it."""
    if name is None:
        return torch.device("cpu")
    if isinstance(name, torch.device):
        device = name
    else:
        if not _DEVICE.match(str(name)):
            raise EraserError(f"device must be cpu, cuda or cuda:N, got {name!r}")
        device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EraserError(f"device {name!s}: CUDA is not available to this process (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise EraserError(f"device {name!s}: this process sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def model_device(model) -> torch.device:
    """The device of the model's trainable (LoRA) parameters, else of its first parameter (the CPU for a
    callable without parameters, such as a test's stand-in model)."""
    if not hasattr(model, "named_parameters"):
        return torch.device("cpu")
    first = None
    for name, p in model.named_parameters():
        if "lora_" in name:
            return p.device
        first = first if first is not None else p
    return first.device if first is not None else torch.device("cpu")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums and solves are kept in for parameters of ``dtype``: float32 for half precision."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def compute_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits of a half-precision model in float32 for the loss and its curvature (as transformers'
    own loss upcasts them): a bfloat16 log-softmax rounds each NLL to 3 significant digits."""
    return logits.float() if logits.dtype in HALF_DTYPES else logits


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator: draws are made on the CPU and moved, so they do not depend on the device."""
    return torch.Generator(device="cpu").manual_seed(int(seed))
