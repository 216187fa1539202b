"""The small base model built locally (no model hub here) and loading base + LoRA adapters.

The base is an ordinary Llama-architecture Hugging Face directory, sized for a 2-core CPU, with a
byte-level BPE tokenizer trained on a given corpus. ``head_dim`` is 32 because vLLM's CPU attention
supports no smaller head. Anything that loads HF models (``AutoModelForCausalLM``, vLLM) loads it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch

from eraser.errors import AdapterMismatchError, EraserError
from eraser.records import PROMPT_TEMPLATE

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
# Renders OpenAI chat messages in the training prompt format (last user message is the question),
# so /v1/chat/completions and /v1/completions see the same text the adapter was trained on.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    + PROMPT_TEMPLATE.replace("{prompt}", "{{ message['content'] }}")
    + "{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class BaseModelConfig:
    """Shape of the locally built Llama base. Defaults: about 1.3 M parameters, head_dim 32."""

    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 512

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise EraserError(
                f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads={self.num_attention_heads}"
            )


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts``, as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    # Like Llama's tokenizer: encoding with special tokens prepends BOS, so a raw prompt sent to
    # /v1/completions is tokenised as training saw it (training adds BOS itself, see records.encode).
    bos = SPECIAL_TOKENS["bos_token"]
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, core.token_to_id(bos))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_base_model(config: BaseModelConfig, tokenizer, seed: int = 0):
    """A randomly initialised Llama causal LM with the given shape (deterministic for a seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    hf_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(hf_config)
    model.config._attn_implementation = register_attention()
    return model


def save_base_model(model, tokenizer, out_dir: str | Path, provenance: dict | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "eraser_base.json").write_text(json.dumps(provenance or {}, indent=2, default=str))
    return out


# The attention the method runs with: eager (so double backward works, unlike fused SDPA kernels,
# STACK.md) and, unlike transformers' own eager kernel, softmax in the input dtype so float64 checks
# against explicit Hessians and finite differences are exact. Registered under this name.
ATTENTION = "eraser_eager"


def _attention_in_input_dtype(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    from transformers.models.llama.modeling_llama import repeat_kv

    key = repeat_kv(key, module.num_key_value_groups)  # (B, H, T, D)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, T, T)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    weights = torch.nn.functional.softmax(scores, dim=-1)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, T, H, D)
    return output, weights


def register_attention() -> str:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(ATTENTION, _attention_in_input_dtype)
    AttentionMaskInterface.register(ATTENTION, eager_mask)
    return ATTENTION


def load_tokenizer(base_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_dir))


def load_base(base_dir: str | Path, dtype: torch.dtype = torch.float32):
    """Load a base model for the method: eager attention in the input dtype (see ATTENTION), eval mode."""
    from transformers import AutoModelForCausalLM

    path = Path(base_dir)
    if not (path / "config.json").is_file():
        raise EraserError(f"not a Hugging Face model directory (no config.json): {path}")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation=register_attention())
    model.eval()
    return model


def load_adapter(base_model, adapter_dir: str | Path, trainable: bool = True):
    """Wrap ``base_model`` with the PEFT LoRA adapter in ``adapter_dir`` (eval mode, LoRA params trainable).

    Raises AdapterMismatchError when the adapter was not made for this base (missing modules, shapes).
    """
    from peft import PeftModel

    path = Path(adapter_dir)
    if not (path / "adapter_config.json").is_file():
        raise EraserError(f"not a PEFT adapter directory (no adapter_config.json): {path}")
    try:
        model = PeftModel.from_pretrained(base_model, str(path), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as error:
        raise AdapterMismatchError(f"adapter {path} does not fit base model: {error}") from None
    _check_all_lora_weights_loaded(model, path)
    model.eval()
    return model


def _check_all_lora_weights_loaded(model, adapter_dir: Path) -> None:
    """PEFT only warns on missing/unexpected keys; a mismatched pair must be an error here."""
    from safetensors.torch import load_file

    weights_file = adapter_dir / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise EraserError(f"adapter weights missing: {weights_file}")
    saved = load_file(str(weights_file))
    live = {name: p for name, p in model.named_parameters() if "lora_" in name}
    if len(saved) != len(live):
        raise AdapterMismatchError(
            f"adapter {adapter_dir} has {len(saved)} LoRA tensors, the base model wrapped with its config has {len(live)}"
        )
    live_shapes = sorted(tuple(p.shape) for p in live.values())
    saved_shapes = sorted(tuple(t.shape) for t in saved.values())
    if live_shapes != saved_shapes:
        raise AdapterMismatchError(f"adapter {adapter_dir} LoRA shapes do not match the base model")


def base_config_dict(config: BaseModelConfig) -> dict:
    return asdict(config)


def adapter_disabled(model):
    """Context in which a PEFT model computes with its base weights only (a no-op for a plain model)."""
    from contextlib import nullcontext

    return model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
