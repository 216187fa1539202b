"""OpenAI API shapes: request models (validated), response and stream-chunk builders, error bodies.

Only what this service supports is accepted; anything else is a 400 that names the parameter, as
OpenAI does for unknown arguments (``n`` > 1, ``logprobs``, ``echo``, tools are refused by name).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve.engine import Completion, SamplingOptions


TokenId = Annotated[int, Field(ge=0, lt=2**31)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, description="send a last chunk with token usage")


class _Sampling(BaseModel):
    """Parameters shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="the tenant's model name (its tenant name)")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    n: int = Field(1, description="completions per prompt; only 1 is supported")
    stream: bool = Field(False, description="stream server-sent events")
    stream_options: StreamOptions | None = Field(None, description="streaming options")
    stop: str | list[str] | None = Field(None, description="up to 4 stop sequences")
    seed: int | None = Field(None, ge=-(2**63), lt=2**64, description="sampling seed (a 64-bit integer)")
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="penalty on tokens already present")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="penalty by token frequency")
    user: str | None = Field(None, description="end-user id (logged, not used)")
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating after the end-of-sequence token")

    @field_validator("n")
    @classmethod
    def _n(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def sampling(self, max_tokens: int) -> SamplingOptions:
        return SamplingOptions(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=self.stop_sequences(),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """POST /v1/completions. The prompt is used verbatim (no template)."""

    prompt: str | list[TokenId] | list[str] = Field(description="text, token ids, or a list holding one text")
    max_tokens: int | None = Field(16, ge=1, description="tokens to generate (OpenAI's default: 16)")
    echo: bool = Field(False, description="not supported (must be false)")
    logprobs: int | None = Field(None, description="not supported (must be null)")
    best_of: int | None = Field(None, description="not supported (1 or null)")
    suffix: str | None = Field(None, description="not supported (must be null)")

    @model_validator(mode="after")
    def _unsupported(self) -> "CompletionRequest":
        if self.echo:
            raise ValueError("echo is not supported")
        if self.logprobs:
            raise ValueError("logprobs is not supported")
        if self.best_of not in (None, 1):
            raise ValueError("best_of is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise ValueError("prompt: batches of several prompts are not supported; send one per request")
        if self.prompt == "" or self.prompt == []:
            raise ValueError("prompt must not be empty")
        return self

    def prompt_input(self) -> str | list[int]:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            return self.prompt[0]  # type: ignore[return-value]
        return self.prompt  # type: ignore[return-value]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"] = Field(description="who says it")
    content: str | list[TextPart] | None = Field(None, description="text, or text parts")
    name: str | None = Field(None, description="participant name")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions. Messages are rendered with the base model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1, description="the conversation")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate (deprecated name)")
    max_completion_tokens: int | None = Field(None, ge=1, description="tokens to generate")
    logprobs: bool = Field(False, description="not supported (must be false)")
    top_logprobs: int | None = Field(None, description="not supported (must be null)")

    @model_validator(mode="after")
    def _unsupported(self) -> "ChatCompletionRequest":
        if self.logprobs or self.top_logprobs:
            raise ValueError("logprobs is not supported")
        return self

    def template_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(result: Completion) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def completion_body(request_id: str, model: str, result: Completion, created: int | None = None) -> dict[str, Any]:
    return {
        "id": request_id, "object": "text_completion", "created": created or int(time.time()), "model": model,
        "choices": [{"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}],
        "usage": usage(result),
    }


def completion_chunk(request_id: str, model: str, created: int, text: str, finish_reason: str | None) -> dict:
    return {
        "id": request_id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }


def chat_body(request_id: str, model: str, result: Completion, created: int | None = None) -> dict[str, Any]:
    return {
        "id": request_id, "object": "chat.completion", "created": created or int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                     "logprobs": None, "finish_reason": result.finish_reason}],
        "usage": usage(result),
    }


def chat_chunk(request_id: str, model: str, created: int, delta: dict[str, Any], finish_reason: str | None) -> dict:
    return {
        "id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def usage_chunk(request_id: str, model: str, created: int, obj: str, result: Completion) -> dict:
    return {"id": request_id, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(result)}


# OpenAI's error ``type`` per HTTP status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    501: "server_error",
    503: "server_error",
}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}`` as the OpenAI API returns it."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def validation_message(error) -> tuple[str, str | None]:
    """One line (and the parameter) from a pydantic ValidationError."""
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if not isinstance(part, int)]
    # drop union-branch names pydantic puts in the location (e.g. "str", "list[int]")
    location = [part for part in location if "[" not in part and part not in ("str", "int", "function-after")]
    param = ".".join(location) or None
    message = first.get("msg", "invalid request")
    if first.get("type") == "missing":
        message = f"missing required parameter '{param}'"
    elif first.get("type") == "extra_forbidden":
        message = f"unrecognized request argument supplied: {param}"
    elif param:
        message = f"{param}: {message}"
    return message.replace("Value error, ", ""), param
