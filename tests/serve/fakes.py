"""Fakes behind the serving seams (engine, adapter source) for unit tests."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, AsyncIterator

from serve.adapters import AdapterSource
from serve.engine import AdapterRef, Engine, GenerationChunk, Prompt, SamplingOptions
from serve.errors import AdapterLoadError


class FakeEngine(Engine):
    """Answers ``<lora name>:<i>`` token by token; ``gate`` (if set) holds every token until released."""

    def __init__(self) -> None:
        self.adapters: dict[int, AdapterRef] = {}
        self.log: list[tuple[str, Any]] = []
        self.gate: asyncio.Event | None = None
        self.fail_add: set[str] = set()
        self.templates_used: list[str | None] = []

    async def generate(self, prompt: Prompt, options: SamplingOptions, request_id: str,
                       adapter: AdapterRef | None = None) -> AsyncIterator[GenerationChunk]:
        if adapter is not None and adapter.int_id not in self.adapters:
            raise AssertionError(f"request {request_id} uses adapter {adapter} that is not loaded")
        name = adapter.name if adapter else "base"
        for i in range(options.max_tokens):
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(0)
            if adapter is not None:  # it must still be loaded at every step
                assert adapter.int_id in self.adapters, f"{adapter.name} removed while {request_id} ran on it"
            last = i == options.max_tokens - 1
            yield GenerationChunk(f"{name}:{i} ", [i], "length" if last else None, 3, i + 1)

    async def render_chat(self, messages: list[dict[str, Any]], chat_template: str | None = None) -> list[int]:
        self.templates_used.append(chat_template)
        return [len(m.get("content", "")) for m in messages]

    async def add_adapter(self, adapter: AdapterRef) -> None:
        if adapter.name in self.fail_add:
            raise AdapterLoadError(f"cannot load {adapter.name}")
        assert adapter.int_id not in self.adapters, "lora_int_id reused"
        assert all(a.name != adapter.name for a in self.adapters.values()), "lora name reused while loaded"
        assert all(a.path != adapter.path for a in self.adapters.values()), "path reused while loaded"
        self.adapters[adapter.int_id] = adapter
        self.log.append(("add", adapter))

    async def remove_adapter(self, int_id: int) -> bool:
        self.log.append(("remove", int_id))
        return self.adapters.pop(int_id, None) is not None

    async def list_adapters(self) -> set[int]:
        return set(self.adapters)


class FakeSource(AdapterSource):
    """HEAD per tenant in a dict; versions are directories under ``root`` created on fetch."""

    def __init__(self, root: Path, heads: dict[str, str] | None = None) -> None:
        self.root = Path(root)
        self.heads = dict(heads or {})
        self.fetched: list[tuple[str, str]] = []

    def head_version(self, tenant: str) -> str | None:
        return self.heads.get(tenant)

    def fetch(self, tenant: str, version: str) -> Path:
        path = self.root / tenant / version
        path.mkdir(parents=True, exist_ok=True)
        (path / "adapter_model.safetensors").write_text(f"{tenant} {version}")
        self.fetched.append((tenant, version))
        return path

    def discard(self, tenant: str, version: str) -> None:
        import shutil

        shutil.rmtree(self.root / tenant / version, ignore_errors=True)
