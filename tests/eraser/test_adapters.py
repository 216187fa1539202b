"""Which PEFT adapters the method takes: every LoRA variant it computes exactly loads and gives PEFT's
own logits; every feature it would mishandle is refused by name, leaving the base as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eraser.bases import build_base
from eraser.errors import AdapterMismatchError, UnsupportedAdapterError
from eraser.model import load_adapter, load_base, save_base_model
from tests.eraser.test_architectures import chat_records, native, records_tokenizer, save_base
from tests.tolerances import assert_close

ARCHITECTURE = "qwen2"  # grouped-query attention, q/k/v biases, tied embeddings


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return save_base(ARCHITECTURE, records_tokenizer(chat_records()), tmp_path_factory.mktemp("base") / "qwen2")


def _batch(vocab: int) -> dict:
    ids = torch.randint(3, vocab, (2, 20), generator=torch.Generator().manual_seed(3))  # (2, T)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _peft_adapter(base_dir: Path, out_dir: Path, config, dtype=torch.float32):
    """A PEFT adapter at a generic point (PEFT starts B at 0, where LoRA does nothing), its LoRA weights
    stored in ``dtype``. Returns PEFT's own model with exactly the stored values, eval mode."""
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(native(base_dir), config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_((0.2 * torch.randn(p.shape, generator=generator)).to(dtype))  # rounded to dtype
                p.data = p.data.to(dtype)
    model.save_pretrained(str(out_dir))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.data = p.data.float()
    return model.eval()


def _lora(**fields):
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", **{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                                **fields})


ACCEPTED = {
    "plain": {},
    "subset": dict(target_modules=["o_proj"]),
    "any rank and alpha": dict(r=3, lora_alpha=5),
    "rslora": dict(use_rslora=True, r=4, lora_alpha=8),
    "dropout": dict(lora_dropout=0.3),
    "rank and alpha patterns": dict(rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 32}),
    "layers_to_transform": dict(layers_to_transform=[1]),
    "regex": dict(target_modules=r".*\.mlp\.(up|down)_proj"),
    "all-linear": dict(target_modules="all-linear"),
    "gaussian init": dict(init_lora_weights="gaussian"),
    "random init": dict(init_lora_weights=False),
    "orthogonal init": dict(init_lora_weights="orthogonal"),
}


STORED = [pytest.param(variant, torch.float32, id=f"{variant}-fp32") for variant in ACCEPTED] + [
    pytest.param(variant, torch.bfloat16, id=f"{variant}-bf16") for variant in ("plain", "rslora", "rank and alpha patterns")]


@pytest.mark.parametrize("variant, dtype", STORED)
def test_supported_lora_gives_peft_logits(variant, dtype, base_dir, tmp_path):
    from safetensors.torch import load_file

    reference = _peft_adapter(base_dir, tmp_path, _lora(**ACCEPTED[variant]), dtype)
    assert {t.dtype for t in load_file(str(tmp_path / "adapter_model.safetensors")).values()} == {dtype}
    model = load_adapter(load_base(base_dir), tmp_path)
    assert not any(module.training for module in model.modules())  # LoRA dropout off
    ours = {name: p for name, p in model.named_parameters() if "lora_" in name}
    theirs = {name: p for name, p in reference.named_parameters() if "lora_" in name}
    assert ours.keys() == theirs.keys() and all(ours[n].dtype == torch.float32 for n in ours)
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    batch = _batch(model.config.vocab_size)
    with torch.no_grad():
        assert_close(model(**batch).logits, reference(**batch).logits, rtol=1e-6)


# Adapters PEFT can build here, and fields only a GPTQ/Megatron setup or a newer PEFT would write
# (given by editing a valid adapter's config).
REFUSED_BUILT = {
    "use_dora": dict(use_dora=True),
    "modules_to_save": dict(modules_to_save=["lm_head"]),
    "bias": dict(bias="lora_only"),
    "lora_bias": dict(lora_bias=True),
    "trainable_token_indices": dict(trainable_token_indices=[5, 6]),
    "target_parameters": dict(target_modules=[], target_parameters=["mlp.down_proj.weight"]),
    "alora_invocation_tokens": dict(alora_invocation_tokens=[5]),
    "init_lora_weights": dict(init_lora_weights="pissa"),
    "layer_replication": dict(layer_replication=[[0, 2], [1, 2]]),
    "embed_tokens": dict(target_modules=["embed_tokens", "q_proj"]),
    "lm_head": dict(target_modules=["lm_head"]),
}
REFUSED_WRITTEN = {
    "use_qalora": {"use_qalora": True},
    "megatron_config": {"megatron_config": {"tensor_model_parallel_size": 2}},
    "fan_in_fan_out": {"fan_in_fan_out": True},
    "velora_config": {"velora_config": {"rank": 2}},
    "use_bdlora": {"use_bdlora": {"lora_a_is_blockdiagonal": True}},
    "bias=all": {"bias": "all"},
    "unknown field 'use_hira'": {"use_hira": True},
}


def _lora_modules(model) -> list[str]:
    return [name for name, _ in model.named_modules() if "lora_" in name]


@pytest.mark.parametrize("field", list(REFUSED_BUILT) + list(REFUSED_WRITTEN))
def test_unsupported_feature_is_refused_by_name(field, base_dir, tmp_path):
    if field in REFUSED_BUILT:
        _peft_adapter(base_dir, tmp_path, _lora(**REFUSED_BUILT[field]))
    else:
        _peft_adapter(base_dir, tmp_path, _lora())
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **REFUSED_WRITTEN[field]}))
    base = load_base(base_dir)
    with pytest.raises(UnsupportedAdapterError, match="is not supported; supported: ") as refused:
        load_adapter(base, tmp_path)
    assert field.split("=")[0] in str(refused.value)
    assert not _lora_modules(base)  # the base is given back unwrapped


def test_other_peft_methods_are_refused(base_dir, tmp_path):
    from peft import IA3Config, get_peft_model

    get_peft_model(native(base_dir), IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                               task_type="CAUSAL_LM")).save_pretrained(str(tmp_path))
    with pytest.raises(UnsupportedAdapterError, match="peft_type='IA3' is not supported; supported: LORA"):
        load_adapter(load_base(base_dir), tmp_path)


def test_adapter_of_another_base_is_a_mismatch(base_dir, tmp_path):
    tokenizer = records_tokenizer(chat_records())
    wider = save_base_model(build_base(ARCHITECTURE, tokenizer, intermediate_size=96), tokenizer, tmp_path / "wider")
    _peft_adapter(wider, tmp_path / "mlp", _lora(target_modules=["down_proj"]))
    with pytest.raises(AdapterMismatchError):
        load_adapter(load_base(base_dir), tmp_path / "mlp")
    _peft_adapter(base_dir, tmp_path / "fused", _lora())
    config = json.loads((tmp_path / "fused" / "adapter_config.json").read_text())
    config["target_modules"] = ["qkv_proj"]  # phi3's names on a qwen2 base
    (tmp_path / "fused" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterMismatchError):
        load_adapter(load_base(base_dir), tmp_path / "fused")
