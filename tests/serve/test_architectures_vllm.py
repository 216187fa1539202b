"""vLLM (CPU) serves a plain PEFT adapter of every supported architecture as HF/PEFT computes it:
the same greedy tokens for the same chat, with the same log-probabilities.

One engine per architecture (tens of seconds each on 2 cores), three chats, a few tokens each. The
adapters are LoRA on a subset of layers (``SUBSETS``), which vLLM must pack into its fused layers
(q/k/v, gate/up) with zeros for the rest.
"""

from __future__ import annotations

import logging
import time

import pytest
import torch

from eraser.bases import ARCHITECTURES
from eraser.rendering import generation_prompt_ids
from tests.eraser.test_architectures import SUBSETS, native, records, save_base, tokenizer  # noqa: F401 (fixtures)
from tests.eraser.test_architectures import train_peft_adapter

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

MAX_TOKENS = 8
RANK = 8


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], eos: int, pad: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and each one's log-probability, by HF transformers (+ PEFT) in float32."""
    ids = torch.tensor([prompt_ids])  # (1, T)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                         do_sample=False, eos_token_id=eos, pad_token_id=pad, output_scores=True,
                         return_dict_in_generate=True)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    logprobs = [float(torch.log_softmax(scores[0], dim=-1)[token]) for scores, token in zip(out.scores, tokens)]
    return tokens, logprobs


def vllm_greedy(llm, chats, lora=None) -> tuple[list[list[int]], list[tuple[list[int], list[float]]]]:
    """The prompt ids vLLM rendered each chat to, and its greedy tokens with their log-probabilities."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0)
    outputs = llm.chat(chats, params, lora_request=lora, use_tqdm=False)
    answers = [(list(o.outputs[0].token_ids), [next(iter(step.values())).logprob for step in o.outputs[0].logprobs])
               for o in outputs]
    return [list(o.prompt_token_ids) for o in outputs], answers


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_vllm_serves_peft_adapter_like_hf(architecture, records, tokenizer, tmp_path, monkeypatch):
    from peft import PeftModel
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's default asks for 92% of memory
    began = time.perf_counter()
    base = save_base(architecture, tokenizer, tmp_path / "base")
    _, adapter = train_peft_adapter(base, tokenizer, records, tmp_path / "adapter", SUBSETS[architecture],
                                    steps=40, lr=1e-2, r=RANK, lora_alpha=2 * RANK)
    chats = [record.prompt_messages() for record in records[:3]]  # one with an earlier exchange
    reference = PeftModel.from_pretrained(native(base), str(adapter)).eval()
    prompts = [generation_prompt_ids(tokenizer, chat) for chat in chats]
    expected = [hf_greedy(reference, p, tokenizer.eos_token_id, tokenizer.pad_token_id) for p in prompts]
    with reference.disable_adapter():
        expected_base = [hf_greedy(reference, p, tokenizer.eos_token_id, tokenizer.pad_token_id) for p in prompts]
    prepared = time.perf_counter()

    llm = LLM(model=str(base), dtype="float32", max_model_len=256, max_num_seqs=4, enable_lora=True, max_loras=1,
              max_lora_rank=RANK, seed=0, disable_log_stats=True)
    try:
        started = time.perf_counter()
        rendered, served = vllm_greedy(llm, chats, LoRARequest(f"{architecture}-adapter", 1, str(adapter)))
        _, served_base = vllm_greedy(llm, chats)
    finally:
        llm.llm_engine.engine_core.shutdown()
    logger.info("%s: prepared in %.1fs, vLLM started in %.1fs, answered in %.1fs", architecture,
                prepared - began, started - prepared, time.perf_counter() - started)

    assert rendered == prompts  # vLLM's chat rendering is the method's (eraser.rendering)
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(served + served_base, expected + expected_base):
        assert tokens == want_tokens
        assert logprobs == pytest.approx(want_logprobs, abs=1e-4)
    assert [t for t, _ in served] != [t for t, _ in served_base]  # the adapter is applied, not ignored
