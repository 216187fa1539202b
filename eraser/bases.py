"""Tiny bases of the architectures the method supports, built from their Hugging Face configs.

No model hub is reachable here, so a base is a randomly initialised model of a real architecture's
config class, small enough for a 2-core CPU, and a ChatML tokenizer trained locally. Each keeps what
sets its architecture apart, because that is what the method's own attention
(:data:`eraser.model.ATTENTION`) and the adapter checks must get right:

- ``llama``: the reference decoder (multi-head attention, untied embeddings);
- ``qwen2``: grouped-query attention, biases on q/k/v, tied embeddings;
- ``mistral``: grouped-query attention and a sliding window on every layer;
- ``gemma2``: tanh softcapping of attention scores and of the final logits, sliding-window and
  global layers alternating, ``query_pre_attn_scalar`` instead of ``head_dim`` for the scaling, tied
  embeddings;
- ``phi3``: fused ``qkv_proj`` and ``gate_up_proj`` projections (so LoRA targets other names).

``head_dim`` is 32 everywhere: vLLM's CPU attention has no smaller head size.
"""

from __future__ import annotations

from typing import Iterable

import torch

ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma2", "phi3")

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# ChatML (Qwen's format). HF renders templates with trim_blocks, which drops a newline written right
# after a block tag, so every newline is an expression.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The same text, with TRL's {% generation %} markers around what an assistant turn learns (its content
# and end-of-turn token), so `return_assistant_tokens_mask=True` can find it.
CHATML_GENERATION_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_ATTENTION_AND_MLP = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LORA_TARGETS = {
    "llama": _ATTENTION_AND_MLP,
    "qwen2": _ATTENTION_AND_MLP,
    "mistral": _ATTENTION_AND_MLP,
    "gemma2": _ATTENTION_AND_MLP,
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
}

# What each architecture adds to the shared shape. Windows and softcaps are small enough to act on
# the tiny test sequences and random weights (a 4096-token window or a cap of 50 would never bite).
_EXTRA = {
    "llama": {"tie_word_embeddings": False},
    "qwen2": {"tie_word_embeddings": True},
    "mistral": {"tie_word_embeddings": False, "sliding_window": 8},
    "gemma2": {"tie_word_embeddings": True, "sliding_window": 8, "query_pre_attn_scalar": 24,
               "attn_logit_softcapping": 0.1, "final_logit_softcapping": 2.0},
    "phi3": {"tie_word_embeddings": False},
}


def _config_class(architecture: str):
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

    return {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "gemma2": Gemma2Config,
            "phi3": Phi3Config}[architecture]


def check_architecture(architecture: str) -> None:
    from eraser.errors import EraserError

    if architecture not in ARCHITECTURES:
        raise EraserError(f"architecture must be one of {list(ARCHITECTURES)}, got {architecture!r}")


def lora_targets(architecture: str) -> tuple[str, ...]:
    """Names of every linear layer of a decoder block (what "LoRA on all linear layers" means there)."""
    check_architecture(architecture)
    return _LORA_TARGETS[architecture]


def base_config(architecture: str, tokenizer, *, hidden_size: int = 64, intermediate_size: int = 128,
                num_hidden_layers: int = 2, num_attention_heads: int = 2, num_key_value_heads: int | None = None,
                max_position_embeddings: int = 512, **overrides):
    """The Hugging Face config of a tiny ``architecture`` base for ``tokenizer``.

    ``num_key_value_heads`` defaults to all heads for llama and to one for the others (grouped-query
    attention); ``overrides`` replace any config field (e.g. ``sliding_window``)."""
    from eraser.errors import EraserError

    check_architecture(architecture)
    if hidden_size % num_attention_heads:
        raise EraserError(f"hidden_size={hidden_size} is not a multiple of num_attention_heads={num_attention_heads}")
    if num_key_value_heads is None:
        num_key_value_heads = num_attention_heads if architecture == "llama" else 1
    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
        **_EXTRA[architecture],
    )
    if architecture == "gemma2":
        fields["head_dim"] = hidden_size // num_attention_heads  # Gemma2's own default is 256
    fields.update(overrides)
    return _config_class(architecture)(**fields)


def build_base(architecture: str, tokenizer, seed: int = 0, **shape):
    """A randomly initialised ``architecture`` causal LM (deterministic for a seed) that computes with
    the method's attention; ``shape`` as in :func:`base_config`."""
    from transformers import AutoModelForCausalLM

    from eraser.model import MODEL_CONSTRUCTION, check_tied_embeddings, register_attention

    config = base_config(architecture, tokenizer, **shape)
    with MODEL_CONSTRUCTION:  # the seed and transformers' class-level patches are process-wide
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=register_attention())
    check_tied_embeddings(model, f"{architecture} base")
    return model


def chatml_tokenizer(texts: Iterable[str], vocab_size: int, chat_template: str = CHATML_TEMPLATE):
    """A byte-level BPE tokenizer trained on ``texts`` with ChatML's turn markers as special tokens.

    Its EOS is ``<|im_end|>``, so generation (HF and vLLM) stops at the end of an assistant turn."""
    from eraser.model import train_tokenizer
    from eraser.rendering import RecordFormat, configure

    tokenizer = train_tokenizer(texts, vocab_size)
    tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tokenizer.eos_token = IM_END
    return configure(tokenizer, RecordFormat(chat_template=chat_template))
