"""The method takes its device from the model and keeps a half-precision model's sums in float32.

No GPU here: the device test puts the model on ``meta`` (shapes, no data), where a tensor the method
made on the CPU fails the first operation it meets a model tensor in; every step that reads no number
back (gradients, HVPs, the sampled curvature factor, the low-rank inverse, losses) runs there. A source
check keeps every tensor the method creates explicit about its device.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from eraser.curvature import lora_parameters, per_record_gradients, sampled_ggn_factor
from eraser.devices import HALF_DTYPES, accumulation_dtype, model_device, parse_device, parse_dtype
from eraser.errors import EraserError
from eraser.influence import InfluenceSystem, SolveConfig
from eraser.records import collate, per_record_losses, record_losses
from eraser.requests import EditRequest, merge_edits
from eraser.solvers import LowRankCurvature, eigen_from_factor, power_iteration
from tests.eraser.conftest import tiny_lora_model
from tests.tolerances import EXACT, assert_close, relative_error

ERASER = Path(__file__).resolve().parents[2] / "eraser"
CONFIG = SolveConfig(solver="eigen", damping=0.1, max_iters=0, eval_size=4, micro_batch=4, rank=8, cache_samples=6)


def half_base(model, dtype=torch.bfloat16):
    """``model`` with its frozen base weights in ``dtype`` and its LoRA factors as they were (PEFT's
    ``autocast_adapter_dtype`` keeps them float32 on a half-precision base)."""
    for name, p in model.named_parameters():
        if "lora_" not in name and p.is_floating_point():
            p.data = p.data.to(dtype)
    return model


def test_every_step_that_reads_no_number_runs_on_the_models_device(records, tokenizer):
    model = tiny_lora_model(tokenizer, dtype=torch.float32).to("meta")
    assert model_device(model) == torch.device("meta")
    edits = merge_edits([EditRequest(kind="remove", records=("c1-0", "c1-1"))], records)
    system = InfluenceSystem(model, tokenizer, records, CONFIG)
    assert system.device == torch.device("meta")

    b = system.gradient_of_edits(edits)  # collate, accumulators, gradient sums
    hv = system.curvature_mean(system.eval_indices, b)  # GGN vector products
    factor = system.sampled_factor(system.cache_indices())  # labels drawn on the CPU, sampled on the device
    losses = record_losses(model, collate(records[:3], tokenizer))  # a CPU batch moves to the model
    rows = per_record_gradients(model, lora_parameters(model), collate(records[:3], tokenizer))
    for tensor in (b, hv, factor, losses, rows):
        assert tensor.device.type == "meta"
    assert b.dtype == hv.dtype == factor.dtype == torch.float32
    assert factor.shape == (CONFIG.cache_draws * CONFIG.cache_samples, system.dim)

    # a curvature warmed elsewhere arrives on the CPU and moves to the model's device
    cpu_cache = LowRankCurvature(vectors=torch.zeros(system.dim, 3), values=torch.ones(3))
    warmed = InfluenceSystem(model, tokenizer, records, CONFIG, cache=cpu_cache)
    assert warmed.curvature_cache().vectors.device.type == "meta"
    assert warmed.curvature_cache().inverse(b, 0.1).device.type == "meta"


def test_every_tensor_the_method_creates_names_its_device():
    """Factories (torch.zeros, full, tensor, randn, ...) in eraser/ say where they put their tensor (the
    model's device, or "cpu" for staging and seeded draws); generators come from eraser.devices; no
    ``.numpy()`` of a tensor that may be on a GPU."""
    factories = {"zeros", "ones", "full", "empty", "tensor", "as_tensor", "randn", "rand", "randint", "randperm",
                 "arange", "linspace", "eye"}
    missing, generators, numpy = [], [], []
    for path in sorted(ERASER.glob("*.py")):
        source = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value
            if isinstance(owner, ast.Name) and owner.id == "torch":
                where = f"{path.name}:{node.lineno}"
                if node.func.attr in factories and not any(k.arg == "device" for k in node.keywords):
                    missing.append(where)
                if node.func.attr == "Generator" and path.name != "devices.py":
                    generators.append(where)
            if node.func.attr == "numpy" and "cpu" not in ast.get_source_segment(source, node):
                numpy.append(f"{path.name}:{node.lineno}")
    assert not missing, f"tensors created without a device: {missing}"
    assert not generators, f"use eraser.devices.seeded_generator (CPU draws, the same on every device): {generators}"
    assert not numpy, f".numpy() without .cpu(): {numpy}"


def test_half_precision_models_accumulate_and_solve_in_float32(records, tokenizer):
    reference = tiny_lora_model(tokenizer, dtype=torch.float32)
    model = half_base(tiny_lora_model(tokenizer, dtype=torch.float32))
    both_half = tiny_lora_model(tokenizer, dtype=torch.float32).to(torch.bfloat16)  # LoRA factors too
    edits = merge_edits([EditRequest(kind="remove", records=("c1-0", "c1-1"))], records)
    solved = {}
    for name, m in (("float32", reference), ("bfloat16 base", model), ("bfloat16", both_half)):
        system = InfluenceSystem(m, tokenizer, records, CONFIG)
        assert system.dtype == torch.float32
        b = system.gradient_of_edits(edits)
        x, report = system.solve(b)
        cache = system.curvature_cache()
        assert b.dtype == x.dtype == cache.vectors.dtype == cache.values.dtype == torch.float32, name
        assert cache.info["dtype"] == "float32" and torch.isfinite(x).all()
        solved[name] = (b, x, cache)
    b32, x32, cache32 = solved["float32"]
    for name in ("bfloat16 base", "bfloat16"):
        b16, x16, cache16 = solved[name]
        assert relative_error(b16, b32) < 0.05, name  # bfloat16 activations: about 2^-8 per operation
        assert cache16.rank == cache32.rank, name  # no eigenpair lost to bfloat16's eps
        assert relative_error(x16, x32) < 0.25, name
    assert solved["bfloat16 base"][2].info["model_dtype"] == "bfloat16"


def test_the_eigenvalue_floor_is_the_grams_not_the_models_precision():
    """A bfloat16 factor (a bfloat16 model's rows) keeps eigenvalues down to 1e-4 of the top one; the floor
    of 10 bfloat16 eps (0.078) would have dropped all but the largest few."""
    m, p = 12, 200
    generator = torch.Generator().manual_seed(0)
    left, _ = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(p, m, generator=generator, dtype=torch.float64))
    singular = torch.logspace(0, -2, m, dtype=torch.float64)  # eigenvalues 1 .. 1e-4
    factor = (left * singular) @ right.T  # (m, p)
    cache = eigen_from_factor(factor.to(torch.bfloat16), rank=m, count=1)
    assert cache.rank == m and cache.vectors.dtype == torch.float32
    expected = torch.linalg.eigvalsh(factor.to(torch.bfloat16).double().T @ factor.to(torch.bfloat16).double())
    assert_close(cache.values, expected.flip(0)[:m], 1e-4)


def test_labels_and_start_vectors_do_not_depend_on_the_batch_or_the_device(records, tokenizer):
    model = tiny_lora_model(tokenizer)
    params = lora_parameters(model)
    short, long = records[0], max(records, key=lambda r: len(r.response))
    alone = sampled_ggn_factor(model, params, collate([short], tokenizer), draws=2, seeds=[5])
    padded = sampled_ggn_factor(model, params, collate([long, short], tokenizer), draws=2, seeds=[9, 5])
    assert collate([long, short], tokenizer).input_ids.shape[1] > collate([short], tokenizer).input_ids.shape[1]
    assert_close(alone, padded.view(2, 2, -1)[:, 1], EXACT)  # the padding of a wider batch draws nothing
    seen = []

    def apply(v):
        seen.append(v)
        raise StopIteration  # the start vector is all this looks at

    for device in ("cpu", "meta"):
        with pytest.raises(StopIteration):
            power_iteration(apply, 7, iters=1, seed=3, device=device)
    start = torch.randn(7, generator=torch.Generator().manual_seed(3))
    assert seen[1].device.type == "meta" and torch.equal(seen[0], start / start.norm())  # drawn on the CPU


def test_the_methods_attention_runs_in_bfloat16_as_transformers_eager_does(tokenizer, records):
    """bfloat16 scores are masked and normalised in float32 (as transformers' eager attention does): the
    method's bfloat16 forward equals the native eager one's and stays near float32, padding included."""
    model = tiny_lora_model(tokenizer, dtype=torch.float32)
    batch = collate(records[:4], tokenizer)
    assert (batch.attention_mask == 0).any()  # right padding in the batch
    reference = record_losses(model, batch)
    half_base(model)
    ours = record_losses(model, batch)
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
    assert (ours - reference).abs().max() < 0.05
    model.base_model.model.set_attn_implementation("eager")  # transformers' own, softmax in float32
    native = record_losses(model, batch)
    assert (ours - native).abs().max() < 1e-2
    assert per_record_losses(model, records[:2], tokenizer).device == torch.device("cpu")


def test_devices_and_dtypes_are_named_and_refused_by_name():
    assert parse_dtype("bfloat16") is torch.bfloat16 and parse_dtype(torch.float16) is torch.float16
    assert accumulation_dtype(torch.bfloat16) == accumulation_dtype(torch.float16) == torch.float32
    assert accumulation_dtype(torch.float64) == torch.float64 and torch.bfloat16 in HALF_DTYPES
    assert parse_device("cpu") == torch.device("cpu") and parse_device(None) == torch.device("cpu")
    with pytest.raises(EraserError, match="device must be"):
        parse_device("gpu0")
    with pytest.raises(EraserError, match="dtype must be"):
        parse_dtype("int8")
    if not torch.cuda.is_available():
        with pytest.raises(EraserError, match="CUDA is not available"):
            parse_device("cuda:0")
