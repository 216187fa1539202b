"""The small base model built locally (no model hub here) and loading base + LoRA adapters.

The base is an ordinary Llama-architecture Hugging Face directory, sized for a 2-core CPU, with a
byte-level BPE tokenizer trained on a given corpus. ``head_dim`` is 32 because vLLM's CPU attention
supports no smaller head. Anything that loads HF models (``AutoModelForCausalLM``, vLLM) loads it.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch

from eraser.devices import accumulation_dtype, parse_device
from eraser.errors import AdapterMismatchError, EraserError, UnsupportedAdapterError, UnsupportedModelError
from eraser.rendering import BUILTIN_CHAT_TEMPLATE, RecordFormat, configure

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
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
    # /v1/completions is tokenised as training saw it (the chat template writes BOS itself).
    bos = SPECIAL_TOKENS["bos_token"]
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, core.token_to_id(bos))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)
    return configure(tokenizer, RecordFormat(chat_template=BUILTIN_CHAT_TEMPLATE))


def build_base_model(config: BaseModelConfig, tokenizer, seed: int = 0):
    """A randomly initialised Llama causal LM with the given shape (deterministic for a seed)."""
    from eraser.bases import build_base

    return build_base("llama", tokenizer, seed=seed, hidden_size=config.hidden_size,
                      intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                      num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
                      max_position_embeddings=config.max_position_embeddings)


def save_base_model(model, tokenizer, out_dir: str | Path, provenance: dict | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "eraser_base.json").write_text(json.dumps(provenance or {}, indent=2, default=str))
    return out


# The attention the method runs with: eager (so double backward works, unlike fused SDPA kernels,
# docs/operations.md, pitfalls) and, unlike transformers' own eager kernels, softmax in the input dtype so float64 checks
# against explicit Hessians and finite differences are exact; a half-precision model's scores are
# masked and normalised in float32, as transformers' eager attention does. Registered under this name.
ATTENTION = "eraser_eager"

# Keyword arguments the supported architectures' attention layers pass through (transformers 5.19:
# Llama, Qwen2, Mistral, Gemma2, Phi3, and PEFT around them) that change nothing in an eager
# computation: positions are already in the rotated query and key, the cache in the key and value,
# the rest are output flags.
_INERT_KWARGS = frozenset({"position_ids", "cache_position", "use_cache", "output_attentions",
                           "output_hidden_states", "output_router_logits", "num_items_in_batch"})


def _attention_in_input_dtype(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                              softcap=None, sliding_window=None, **kwargs):
    """Each supported architecture's eager attention, softmax in the input dtype (float32 for bfloat16 and
    float16 inputs: the mask's large negative values and the normalisation need its range and precision;
    the weights are cast back to the input dtype for the product with the values).

    ``softcap`` (Gemma2) caps the scaled scores with ``softcap * tanh(scores / softcap)`` before the
    mask, as Gemma2's kernel does. ``sliding_window`` needs nothing here: in eager attention the
    window is in the mask transformers builds for each sliding layer. Any other argument is refused
    rather than dropped: some change the result (attention sinks ``s_aux``), the others (packed
    sequence lengths, ``is_causal``) the method never uses and so never checked.
    """
    from transformers.models.llama.modeling_llama import repeat_kv

    unsupported = sorted(set(kwargs) - _INERT_KWARGS)
    if unsupported:
        raise UnsupportedModelError(
            f"{type(module).__name__} passes {unsupported} to its attention, which the method's attention "
            f"({ATTENTION}) does not implement; supported: dropout, scaling, softcap, sliding_window")
    if sliding_window is not None and attention_mask is None:
        raise UnsupportedModelError(f"{type(module).__name__} has a sliding window but no attention mask to carry it")
    if scaling is None:
        scaling = module.head_dim**-0.5
    key = repeat_kv(key, module.num_key_value_groups)  # (B, H, S, D)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, T, S)
    scores = scores.to(accumulation_dtype(scores.dtype))
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]].to(scores.dtype)
    weights = torch.nn.functional.softmax(scores, dim=-1).to(value.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, T, H, D)
    return output, weights


# transformers 5.19's ``from_pretrained`` replaces ``PreTrainedModel.tie_weights`` and ``init_weights``
# on the class with no-ops while it loads, and then puts back what it found there. Two threads loading
# at once can put the no-ops back for good: from then on every base with tied embeddings (Qwen2,
# Gemma2) loads with a freshly initialised output layer and the method differentiates a different
# model. It does the same to torch's ``nn.init`` functions, which PEFT initialises new LoRA factors
# with. The service loads from several threads (one per tenant, jobs run in process), so every model
# construction here takes this lock; code outside ``eraser`` that builds models in a process shared
# with the service should take it too.
MODEL_CONSTRUCTION = threading.RLock()


def check_tied_embeddings(model, where: str = "model") -> None:
    """Raise EraserError when the config ties the output layer to the input embedding and the model
    does not: transformers skipped the tying (see MODEL_CONSTRUCTION), and its output layer is not the
    one it was trained with."""
    config = model.config.get_text_config(decoder=True)
    output = model.get_output_embeddings()
    if getattr(config, "tie_word_embeddings", False) and output is not None \
            and output.weight is not model.get_input_embeddings().weight:
        raise EraserError(f"{where}: the config ties the output layer to the input embedding but transformers "
                          "left them apart (a model loaded concurrently in this process without "
                          "eraser.model.MODEL_CONSTRUCTION?); refusing to compute on a different model")


def register_attention() -> str:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(ATTENTION, _attention_in_input_dtype)
    AttentionMaskInterface.register(ATTENTION, eager_mask)
    return ATTENTION


def load_tokenizer(base_dir: str | Path, fmt: RecordFormat = RecordFormat()):
    """The base's tokenizer with the tenant's rendering (chat template and token limit, see
    :mod:`eraser.rendering`): the one every part of the method tokenises records with."""
    from transformers import AutoTokenizer

    return configure(AutoTokenizer.from_pretrained(str(base_dir)), fmt)


def load_base(base_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
    """Load a base model for the method: eager attention in the input dtype (see ATTENTION), eval mode, its
    weights in ``dtype`` on ``device`` (default: the CPU). An adapter loaded onto it follows its device;
    PEFT keeps its LoRA factors in float32 on a half-precision base."""
    from transformers import AutoModelForCausalLM

    path = Path(base_dir)
    if not (path / "config.json").is_file():
        raise EraserError(f"not a Hugging Face model directory (no config.json): {path}")
    target = parse_device(device)
    with MODEL_CONSTRUCTION:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation=register_attention())
    check_tied_embeddings(model, str(path))
    if target.type != "cpu":
        model.to(target)
    model.eval()
    return model


def load_adapter(base_model, adapter_dir: str | Path, trainable: bool = True):
    """Wrap ``base_model`` with the PEFT LoRA adapter in ``adapter_dir`` (eval mode, LoRA params trainable).

    Raises UnsupportedAdapterError when the adapter uses a PEFT feature the method does not handle
    (see ``LORA_FIELDS``; the base is left unwrapped), AdapterMismatchError when it was not made for
    this base (missing modules, shapes).
    """
    from peft import PeftModel

    path = Path(adapter_dir)
    if not (path / "adapter_config.json").is_file():
        raise EraserError(f"not a PEFT adapter directory (no adapter_config.json): {path}")
    check_adapter_config(json.loads((path / "adapter_config.json").read_text()), path)
    try:
        with MODEL_CONSTRUCTION:  # PEFT builds its layers with torch's init functions (see MODEL_CONSTRUCTION)
            model = PeftModel.from_pretrained(base_model, str(path), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as error:
        raise AdapterMismatchError(f"adapter {path} does not fit base model: {error}") from None
    try:
        _check_lora_layers(model, path)
    except UnsupportedAdapterError:
        model.unload()  # give the caller its base back as it was
        raise
    _check_all_lora_weights_loaded(model, path)
    model.eval()
    return model


def _one_of(*allowed):
    """A field check: the value is one of ``allowed``, type included (so 1 is not True, 0 not False)."""
    return lambda value: any(type(value) is type(a) and value == a for a in allowed)


def _any(value) -> bool:
    return True


_ABSENT = _one_of(None, [], {})
_OFF = _one_of(False, None)

# Every field of PEFT 0.21.2's LoraConfig (and PeftConfig's), with the values the method supports and
# what to say when another is given. The method computes LoRA's forward pass, x W^T + s x A^T B^T with
# s = alpha / r (alpha / sqrt(r) for rsLoRA) per layer, and differentiates it over A and B alone, in
# eval mode; anything that changes that pass, trains other tensors or changes the base is refused, and
# so is any field this table does not know (a newer PEFT's feature could be any of these).
LORA_FIELDS: dict[str, tuple] = {
    # what the adapter is and where it came from
    "peft_type": (_one_of("LORA"), "LORA"),
    "task_type": (_one_of("CAUSAL_LM", None), "CAUSAL_LM"),
    "base_model_name_or_path": (_any, "any"),
    "revision": (_any, "any"),
    "peft_version": (_any, "any"),
    "auto_mapping": (_any, "any"),
    "inference_mode": (_any, "any"),
    # which linear layers get a LoRA, of what rank and scale (which layers: checked once wrapped)
    "r": (_any, "any"),
    "lora_alpha": (_any, "any"),
    "target_modules": (_any, "any"),
    "exclude_modules": (_any, "any"),
    "layers_to_transform": (_any, "any"),
    "layers_pattern": (_any, "any"),
    "rank_pattern": (_any, "any"),
    "alpha_pattern": (_any, "any"),
    "use_rslora": (_any, "any"),
    "lora_dropout": (_any, "any (the method runs in eval mode)"),
    # inits only set A and B, which loading overwrites; the others (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA,
    # MiCA) change the base weights or freeze a factor
    "init_lora_weights": (_one_of(True, False, "gaussian", "orthogonal"), "true, false, 'gaussian' or 'orthogonal'"),
    "loftq_config": (_ABSENT, "none"),
    "eva_config": (_ABSENT, "none"),
    "corda_config": (_ABSENT, "none"),
    "lora_ga_config": (_ABSENT, "none"),
    # other tensors trained or tied
    "bias": (_one_of("none"), "'none' (base biases stay frozen)"),
    "modules_to_save": (_ABSENT, "none (only LoRA factors are trained)"),
    "trainable_token_indices": (_ABSENT, "none (only LoRA factors are trained)"),
    "target_parameters": (_ABSENT, "none (LoRA on linear modules, not on raw parameters)"),
    "ensure_weight_tying": (_any, "any (tied layers cannot be targeted)"),
    "fan_in_fan_out": (_OFF, "false (Conv1D layers; the supported architectures have none)"),
    # variants of the forward pass
    "use_dora": (_OFF, "false (DoRA)"),
    "lora_bias": (_OFF, "false (a bias on LoRA's B)"),
    "use_qalora": (_OFF, "false (QA-LoRA)"),
    "qalora_group_size": (_any, "any (read only with use_qalora)"),
    "alora_invocation_tokens": (_ABSENT, "none (activated LoRA)"),
    "velora_config": (_ABSENT, "none (VeLoRA's own backward)"),
    "monteclora_config": (_ABSENT, "none (MonteCLoRA's sampling)"),
    "use_bdlora": (_ABSENT, "none (block-diagonal LoRA)"),
    "arrow_config": (_ABSENT, "none (Arrow routing)"),
    "kasa_config": (_ABSENT, "none (KaSA)"),
    "layer_replication": (_ABSENT, "none (it changes the base's layers)"),
    "megatron_config": (_ABSENT, "none (Megatron parallel layers)"),
    "megatron_core": (_any, "any (read only with megatron_config)"),
}


def check_adapter_config(config: dict, where: str | Path = "adapter") -> None:
    """Refuse an ``adapter_config.json`` that uses anything ``LORA_FIELDS`` does not support."""
    if config.get("peft_type") != "LORA":
        raise UnsupportedAdapterError(
            f"{where}: peft_type={config.get('peft_type')!r} is not supported; supported: LORA")
    problems = []
    for field, value in config.items():
        if field not in LORA_FIELDS:
            problems.append(f"unknown field {field!r} is not supported; supported: the fields of peft 0.21.2's "
                            f"LoraConfig (the adapter was written by peft {config.get('peft_version', '?')})")
        elif not LORA_FIELDS[field][0](value):
            problems.append(f"{field}={value!r} is not supported; supported: {LORA_FIELDS[field][1]}")
    if problems:
        raise UnsupportedAdapterError(f"{where}: " + "; ".join(problems))


def _check_lora_layers(model, adapter_dir: Path) -> None:
    """LoRA only on the decoder blocks' linear layers, the layers the method's checks cover: not on
    embeddings or the output layer (vLLM 0.32 serves LoRA there for Llama-like models only, not Qwen2,
    Mistral or Gemma2, and a tied output layer is the input embedding), nor on other module types."""
    from peft.tuners.lora import Linear, LoraLayer

    base = model.get_base_model()
    ends = {id(base.get_input_embeddings()), id(base.get_output_embeddings())}
    refused = [name.removeprefix("base_model.model.") for name, module in model.named_modules()
               if isinstance(module, LoraLayer)
               and (type(module) is not Linear or id(module) in ends or id(module.get_base_layer()) in ends)]
    if refused:
        raise UnsupportedAdapterError(f"{adapter_dir}: LoRA on {refused} is not supported; supported: the linear "
                                      "layers of the decoder blocks (not embeddings, not the output layer)")


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
