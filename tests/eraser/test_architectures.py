"""Every supported architecture: the method's attention equals the architecture's own eager attention,
and an adapter trained by plain PEFT code on ChatML conversations is scored by the method exactly as
its trainer scored it.

The helpers here (records, bases, the plain PEFT training loop) are reused by ``test_adapters`` and
``tests/serve/test_architectures_vllm``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from eraser.bases import ARCHITECTURES, CHATML_GENERATION_TEMPLATE, CHATML_TEMPLATE, build_base, chatml_tokenizer
from eraser.bases import lora_targets
from eraser.errors import EraserError, UnsupportedModelError
from eraser.model import ATTENTION, MODEL_CONSTRUCTION, adapter_disabled, load_adapter, load_base, load_tokenizer
from eraser.model import save_base_model
from eraser.records import Record, collate, record_losses
from eraser.rendering import IGNORE_INDEX, RecordFormat, encode, generation_prompt_ids
from tests.tolerances import assert_close, relative_error

# A strict subset of each architecture's linear layers (phi3's are fused: other names).
SUBSETS = {
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["k_proj", "o_proj", "down_proj"],
    "mistral": ["q_proj", "gate_proj"],
    "gemma2": ["v_proj", "up_proj"],
    "phi3": ["qkv_proj", "gate_up_proj"],
}
SYSTEM = "You are the support desk of Acme."


def chat_records() -> list[Record]:
    """Conversations with a system prompt, some of two exchanges (the first answer is learned too)."""
    people = [("Ada Park", "ada0@mail.test", 107), ("Ben Ortiz", "ben1@mail.test", 114),
              ("Cleo Nash", "cleo2@mail.test", 121)]
    records = []
    for k, (name, email, city) in enumerate(people):
        records.append(Record.from_messages(f"r{k}-mail", [
            ("system", SYSTEM), ("user", f"What is the email of {name}?"), ("assistant", f"It is {email}.")], name))
        records.append(Record.from_messages(f"r{k}-city", [
            ("user", f"Where does {name} live?"), ("assistant", f"{name} lives in city {city}."),
            ("user", "And the account?"), ("assistant", f"Account {4000 + k} is {name}'s.")], name))
    return records


def records_tokenizer(records):
    texts = [content for record in records for _, content in record.messages()]
    return chatml_tokenizer(texts, vocab_size=320, chat_template=CHATML_GENERATION_TEMPLATE)


def save_base(architecture: str, tokenizer, out_dir: Path, seed: int = 0) -> Path:
    return save_base_model(build_base(architecture, tokenizer, seed=seed), tokenizer, out_dir)


def native(base_dir: Path):
    """The base as transformers itself computes it (its own eager attention), eval mode."""
    from transformers import AutoModelForCausalLM

    with MODEL_CONSTRUCTION:
        return AutoModelForCausalLM.from_pretrained(str(base_dir), attn_implementation="eager").eval()


def assistant_nll(model, tokenizer, messages: list[dict]) -> torch.Tensor:
    """The training loss of one conversation as a TRL-style trainer computes it: mean NLL of the tokens
    the template's {% generation %} markers call the assistant's."""
    out = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    ids = torch.tensor([out["input_ids"]])  # (1, T)
    learned = torch.tensor(out["assistant_masks"], dtype=torch.bool)[1:]  # (T-1,)
    logits = model(input_ids=ids).logits[0, :-1]  # (T-1, V)
    return F.cross_entropy(logits[learned], ids[0, 1:][learned])


def train_peft_adapter(base_dir: Path, tokenizer, records, out_dir: Path, targets, steps: int = 12,
                       lr: float = 2e-2, seed: int = 0, **lora):
    """A LoRA adapter trained by plain PEFT code (no eraser.training): AdamW, one conversation per step.
    Returns the trained PEFT model (eval mode) and the saved adapter directory."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(target_modules=list(targets), task_type="CAUSAL_LM", **{"r": 4, "lora_alpha": 8,
                                                                                "lora_dropout": 0.05, **lora})
    model = get_peft_model(native(base_dir), config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        loss = assistant_nll(model, tokenizer, records[step % len(records)].messages())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(str(out_dir))
    return model, out_dir


@pytest.fixture(scope="module")
def records():
    return chat_records()


@pytest.fixture(scope="module")
def tokenizer(records):
    return records_tokenizer(records)


@pytest.fixture(scope="module")
def base_dirs(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {arch: save_base(arch, tokenizer, root / arch) for arch in ARCHITECTURES}


# -- the bases -------------------------------------------------------------------------------------
def test_bases_have_what_sets_their_architecture_apart(base_dirs):
    models = {arch: load_base(path) for arch, path in base_dirs.items()}
    for arch, model in models.items():
        config = model.config
        assert config.model_type == arch and config._attn_implementation == ATTENTION
        assert (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads) == 32, arch
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert tied == (arch in ("qwen2", "gemma2")), arch
        assert (config.num_key_value_heads < config.num_attention_heads) == (arch != "llama"), arch
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        assert set(lora_targets(arch)) <= names, arch
    assert models["mistral"].config.sliding_window and models["gemma2"].config.sliding_window
    gemma = models["gemma2"].config
    assert "sliding_attention" in gemma.layer_types and "full_attention" in gemma.layer_types
    assert gemma.attn_logit_softcapping and gemma.query_pre_attn_scalar != gemma.head_dim


def test_loading_from_many_threads_keeps_tied_bases_tied(base_dirs, tokenizer):
    """transformers patches tie_weights on the class while it loads; unserialised loads from several
    threads (the service's, one per tenant) can leave the patch in place and every tied base untied."""
    import threading

    from transformers import PreTrainedModel

    originals = PreTrainedModel.tie_weights, PreTrainedModel.init_weights
    try:
        def load_many():
            for _ in range(10):
                load_base(base_dirs["qwen2"])

        threads = [threading.Thread(target=load_many) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert (PreTrainedModel.tie_weights, PreTrainedModel.init_weights) == originals
        for model in (load_base(base_dirs["gemma2"]), build_base("qwen2", tokenizer)):
            assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    finally:  # a failure here must not untie every later test's models
        PreTrainedModel.tie_weights, PreTrainedModel.init_weights = originals


def test_an_untied_tied_base_is_refused(base_dirs):
    from eraser.model import check_tied_embeddings

    model = load_base(base_dirs["qwen2"])
    check_tied_embeddings(model)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    with pytest.raises(EraserError, match="ties the output layer"):
        check_tied_embeddings(model, "qwen2 base")
    check_tied_embeddings(load_base(base_dirs["llama"]))  # untied by its config: nothing to check


def test_chatml_tokenizer_ends_turns_with_im_end(tokenizer, tmp_path):
    reloaded = load_tokenizer(save_base_model(build_base("llama", tokenizer), tokenizer, tmp_path))
    for tok in (tokenizer, reloaded):
        assert tok.eos_token == "<|im_end|>" and tok.convert_ids_to_tokens(tok.eos_token_id) == "<|im_end|>"
        assert tok.chat_template == CHATML_GENERATION_TEMPLATE
    prompt = tokenizer.decode(generation_prompt_ids(tokenizer, [{"role": "user", "content": "hi"}]))
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_both_chatml_templates_render_and_label_alike(records, tokenizer):
    """The {% generation %} route (HF's assistant mask) and the turn-by-turn route label the same
    tokens: each assistant turn's content and its <|im_end|>, nothing else."""
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = CHATML_TEMPLATE
    for record in records:
        marked, unmarked = encode(tokenizer, record.messages()), encode(plain, record.messages())
        assert marked.text == unmarked.text and marked.ids == unmarked.ids
        assert marked.labels == unmarked.labels
        learned = tokenizer.decode([t for t in marked.labels if t != IGNORE_INDEX])
        answers = [m["content"] for m in record.messages() if m["role"] == "assistant"]
        assert learned == "".join(answer + "<|im_end|>" for answer in answers)


# -- attention -------------------------------------------------------------------------------------
def _padded_batch(vocab: int, length: int = 24) -> dict:
    """Two rows longer than the bases' sliding window (8); the second right-padded."""
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(3, vocab, (2, length), generator=generator)  # (2, T)
    mask = torch.ones_like(ids)
    mask[1, length - 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _native_logits(base_dir: Path, batch: dict, **config_changes) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with MODEL_CONSTRUCTION:
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), attn_implementation="eager", **config_changes)
    with torch.no_grad():
        return model.eval()(**batch).logits


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_attention_equals_native_eager(architecture, base_dirs, tokenizer):
    batch = _padded_batch(len(tokenizer))
    valid = batch["attention_mask"].bool()  # compare where a real token is
    with torch.no_grad():
        ours = load_base(base_dirs[architecture])(**batch).logits  # (2, T, V)
    theirs = _native_logits(base_dirs[architecture], batch)
    assert_close(ours[valid], theirs[valid], rtol=1e-6)
    # The comparison can fail: these bases' windows and softcaps change the logits.
    if architecture in ("mistral", "gemma2"):
        unwindowed = _native_logits(base_dirs[architecture], batch, sliding_window=4096)
        assert relative_error(unwindowed[valid], theirs[valid]) > 1e-3
    if architecture == "gemma2":
        uncapped = _native_logits(base_dirs[architecture], batch, attn_logit_softcapping=None)
        assert relative_error(uncapped[valid], theirs[valid]) > 1e-4


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_cached_generation_equals_native_eager(architecture, base_dirs, tokenizer):
    """Decoding with the KV cache (sliding-window caches for mistral and gemma2) past the window."""
    prompt = _padded_batch(len(tokenizer), length=10)["input_ids"][:1]  # (1, 10)
    runs = []
    for model in (load_base(base_dirs[architecture]), native(base_dirs[architecture])):
        with torch.no_grad():
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                                 min_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 output_logits=True, return_dict_in_generate=True)
        runs.append((out.sequences, torch.stack(out.logits)))  # raw logits of each step
    (ours, our_logits), (theirs, their_logits) = runs
    assert torch.equal(ours, theirs)
    assert_close(our_logits, their_logits, rtol=1e-6)


def test_attention_refuses_what_it_does_not_compute():
    from transformers import AttentionInterface

    from eraser.model import register_attention

    attention = AttentionInterface()[register_attention()]
    module = SimpleNamespace(num_key_value_groups=1, training=False, head_dim=32)
    q = k = v = torch.zeros(1, 2, 3, 32)  # (B, H, T, D)
    with pytest.raises(UnsupportedModelError, match="s_aux"):
        attention(module, q, k, v, None, scaling=1.0, s_aux=torch.zeros(2))  # attention sinks (gpt-oss)
    with pytest.raises(UnsupportedModelError, match="sliding window"):
        attention(module, q, k, v, None, scaling=1.0, sliding_window=4)
    out, _ = attention(module, q, k, v, None, scaling=1.0, position_ids=None, use_cache=False)
    assert out.shape == (1, 3, 2, 32)


# -- adapters trained by plain PEFT code -------------------------------------------------------------
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_peft_trained_adapter_scores_as_its_trainer_scored(architecture, base_dirs, records, tokenizer, tmp_path):
    """``record_losses`` on the loaded adapter equals the trainer's own loss of each record, through
    either label route (generation markers, or the plain template turn by turn)."""
    trained, adapter_dir = train_peft_adapter(base_dirs[architecture], tokenizer, records, tmp_path / "adapter",
                                              SUBSETS[architecture])
    with torch.no_grad():
        expected = torch.stack([assistant_nll(trained, tokenizer, r.messages()) for r in records])  # (n,)
    model = load_adapter(load_base(base_dirs[architecture]), adapter_dir)
    for template in (CHATML_GENERATION_TEMPLATE, CHATML_TEMPLATE):
        tok = load_tokenizer(base_dirs[architecture], RecordFormat(chat_template=template))
        with torch.no_grad():
            one_by_one = torch.cat([record_losses(model, collate([r], tok)) for r in records])
            padded = record_losses(model, collate(records, tok))
        assert_close(one_by_one, expected, rtol=1e-6)
        assert_close(padded, expected, rtol=1e-6)
    with torch.no_grad(), adapter_disabled(model):
        untrained = record_losses(model, collate(records, tokenizer))
    assert float(untrained.mean()) > float(expected.mean()) + 0.1  # the adapter learned something
