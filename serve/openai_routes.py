"""The OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

:class:`OpenAIRoutes` is a base class of ``Ingress`` (:mod:`serve.ingress`); Ray Serve binds its
routes because it walks the deployment class's MRO. A tenant's key reaches one model, the tenant's
own (its name). A generation is a job for the engine deployment (sent with the tenant as Serve's
multiplexed model id: :mod:`serve.routing`), admitted within the tenant's share
of this replica (requests in flight, and tokens per minute: :mod:`serve.token_budget`), answered whole
or streamed as server-sent events (:func:`_sse`), its chunks summed into a
:class:`~serve.engine.Completion` (:func:`_add`). The bodies' shapes are :mod:`serve.protocol`'s.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from serve import metrics
from serve.api_errors import ApiError
from serve.engine import Completion
from serve.http_app import app
from serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_body,
    chat_chunk,
    completion_body,
    completion_chunk,
    error_body,
    new_id,
    usage_chunk,
)
from serve.request_body import parse, read_json
from serve.routing import for_tenant
from serve.token_budget import duration

logger = logging.getLogger(__name__)


class OpenAIRoutes:
    """Models, completions and chat completions (a base class of ``Ingress``, after ``IngressAuth``)."""

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> dict[str, Any]:
        tenant = await self._tenant_key(request)
        return {"object": "list", "data": [await self._model_card(tenant)]}

    @app.get("/v1/models/{model}")
    async def get_model(self, model: str, request: Request) -> dict[str, Any]:
        tenant = await self._tenant_key(request)
        self._own_model(tenant, model)
        return await self._model_card(tenant)

    async def _model_card(self, tenant: str) -> dict[str, Any]:
        config = await self._store("get_tenant", tenant)
        return {"id": tenant, "object": "model", "created": int(config.created_at.timestamp()), "owned_by": tenant}

    @staticmethod
    def _own_model(tenant: str, model: str) -> None:
        if model != tenant:  # the same answer whether or not the model exists: no tenant enumeration
            raise ApiError(404, f"The model '{model}' does not exist or you do not have access to it.",
                           "model_not_found", "model")

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        started = time.perf_counter()
        tenant = await self._tenant_key(request)
        body = parse(CompletionRequest, await read_json(request, self.config.max_body_bytes))
        self._own_model(tenant, body.model)
        job = self._job(request, tenant, body, body.max_tokens, prompt=body.prompt_input())
        return await self._admitted(request, job, body, "completions", started)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        started = time.perf_counter()
        tenant = await self._tenant_key(request)
        body = parse(ChatCompletionRequest, await read_json(request, self.config.max_body_bytes))
        self._own_model(tenant, body.model)
        job = self._job(request, tenant, body, body.requested_tokens(), messages=body.template_messages())
        return await self._admitted(request, job, body, "chat", started)

    async def _admitted(self, request: Request, job: dict[str, Any], body, route: str, started: float):
        """``_respond`` within the tenant's share of this replica: at most ``max_concurrent_per_tenant``
        generations at once and ``tenant_tokens_per_minute`` tokens (429 beyond either), so one tenant
        cannot fill the engine queues, nor keep them busy, for all."""
        tenant = job["tenant"]
        self._check_concurrency(tenant, route, started)
        reserved = self._reserve_tokens(job, route, started)
        self._running[tenant] = self._running.get(tenant, 0) + 1
        metrics.running(tenant, self._running[tenant])
        released = False

        def release(result: Completion | None) -> None:
            """Free the slot and settle the reservation to what ``result`` used (None: nothing), once (the
            end or the error)."""
            nonlocal released
            if not released:
                released = True
                self._running[tenant] -= 1
                metrics.running(tenant, self._running[tenant])
                used = 0 if result is None else result.prompt_tokens + result.completion_tokens
                if result is not None:
                    metrics.tokens_used(tenant, result.prompt_tokens, result.completion_tokens)
                if self._tokens is not None:
                    self._tokens.settle(tenant, reserved, used)

        try:
            response = await self._respond(request, job, body, route, started, release)
        except BaseException:
            release(None)  # a no-op when the response already settled what it generated
            raise
        response.headers.update(self._token_headers(tenant))
        return response  # a stream releases when it ends (its generator's finally)

    def _check_concurrency(self, tenant: str, route: str, started: float) -> None:
        running, limit = self._running.get(tenant, 0), self.config.max_concurrent_per_tenant
        if running >= limit:
            self._limited(tenant, route, started, "concurrency")
            raise ApiError(429, f"model {tenant!r} has {running} requests running on this replica, its limit; "
                           "retry later", "tenant_concurrency_limit")

    def _reserve_tokens(self, job: dict[str, Any], route: str, started: float) -> int:
        """Reserve the job's worst case (:func:`_worst_case`) in the tenant's token bucket and return it
        (0 without a limit); 429 with Retry-After when the bucket cannot cover it now, 400 when it never can."""
        if self._tokens is None:
            return 0
        tenant, capacity = job["tenant"], self._tokens.capacity
        tokens = _worst_case(job, self.config.engine.max_model_len)
        wait_s = self._tokens.reserve(tenant, tokens)
        if wait_s == 0.0:
            return tokens
        if math.isinf(wait_s):
            metrics.request_done(tenant, route, 400, time.perf_counter() - started)
            raise ApiError(400, f"this request may use {tokens} tokens (max_tokens plus the prompt), more than "
                           f"model {tenant!r}'s whole budget of {capacity} tokens per minute on this replica: it "
                           "can never be served; lower max_tokens or shorten the prompt", "request_too_large",
                           "max_tokens", self._token_headers(tenant))
        self._limited(tenant, route, started, "tokens")
        retry = math.ceil(wait_s)
        raise ApiError(429, f"model {tenant!r} is past its rate limit of {capacity} tokens per minute on this "
                       f"replica: this request may use {tokens} tokens, {int(self._tokens.available(tenant))} are "
                       f"left; retry in {retry} s", "rate_limit_exceeded", None,
                       {"retry-after": str(retry), **self._token_headers(tenant)})

    def _token_headers(self, tenant: str) -> dict[str, str]:
        """OpenAI's rate-limit headers for the tenant's token bucket (none without a limit)."""
        if self._tokens is None:
            return {}
        return {"x-ratelimit-limit-tokens": str(self._tokens.capacity),
                "x-ratelimit-remaining-tokens": str(int(self._tokens.available(tenant))),
                "x-ratelimit-reset-tokens": duration(self._tokens.reset_s(tenant))}

    @staticmethod
    def _limited(tenant: str, route: str, started: float, limit: str) -> None:
        metrics.rate_limited(tenant, limit)
        metrics.request_done(tenant, route, 429, time.perf_counter() - started)

    def _job(self, request: Request, tenant: str, body, max_tokens: int | None, **prompt: Any) -> dict[str, Any]:
        limit = self.config.max_tokens_limit
        if max_tokens is not None and max_tokens > limit:
            raise ApiError(400, f"max_tokens {max_tokens} exceeds this service's limit of {limit}", "invalid_request",
                           "max_tokens")
        options = body.sampling(max_tokens if max_tokens is not None else limit)
        request_id = request.headers.get("x-request-id") or new_id("cmpl")
        return {"tenant": tenant, "request_id": request_id, "options": asdict(options), **prompt}

    async def _respond(self, request: Request, job: dict[str, Any], body, route: str, started: float,
                       release: Callable[[Completion | None], None]):
        tenant, request_id = job["tenant"], job["request_id"]
        # to a replica that holds the tenant's adapter if one has room (serve.routing)
        stream = for_tenant(self.engine, tenant, stream=True).generate.remote(job)
        try:
            first = await stream.__anext__()
        except Exception as error:
            logger.exception("request_id=%s tenant=%s engine unreachable", request_id, tenant)
            metrics.request_done(tenant, route, 503, time.perf_counter() - started)
            raise ApiError(503, "the inference engine is unavailable; retry later", "engine_unavailable") from error
        if "error" in first:
            item = first["error"]
            metrics.request_done(tenant, route, item["status"], time.perf_counter() - started)
            raise ApiError(item["status"], item["message"], item["code"])
        headers = {"x-request-id": request_id, "x-eraser-adapter": first["adapter"]}
        created = int(time.time())
        if body.stream:
            events = self._sse_stream(stream, job, body, route, created, started, first["adapter"], release)
            return ClosingStream(events, lambda: (release(None), stream.cancel()), media_type="text/event-stream",
                                 headers=headers)
        result = Completion()
        try:
            async for item in stream:
                if "error" in item:
                    raise ApiError(item["error"]["status"], item["error"]["message"], item["error"]["code"])
                _add(result, item["chunk"])
        finally:
            release(result)
        builder = completion_body if route == "completions" else chat_body
        metrics.request_done(tenant, route, 200, time.perf_counter() - started)
        logger.info("request_id=%s tenant=%s route=%s adapter=%s tokens=%d seconds=%.3f", request_id, tenant, route,
                    first["adapter"], result.completion_tokens, time.perf_counter() - started)
        return JSONResponse(builder(request_id, body.model, result, created), headers=headers)

    async def _sse_stream(self, stream, job, body, route: str, created: int, started: float,
                          adapter: str, release: Callable[[Completion | None], None]) -> AsyncIterator[bytes]:
        """The stream's chunks as server-sent events, then ``[DONE]``; a client that goes away cancels it."""
        request_id, model = job["request_id"], body.model
        result, finished = Completion(), False
        obj = "text_completion" if route == "completions" else "chat.completion.chunk"
        try:
            if route == "chat":
                yield _sse(chat_chunk(request_id, model, created, {"role": "assistant", "content": ""}, None))
            async for item in stream:
                if "error" in item:
                    yield _sse(error_body(item["error"]["status"], item["error"]["message"], item["error"]["code"]))
                    break
                chunk = item["chunk"]
                _add(result, chunk)
                reason = chunk["finish_reason"]
                if chunk["text"] or reason is not None:
                    if route == "completions":
                        yield _sse(completion_chunk(request_id, model, created, chunk["text"], reason))
                    else:
                        delta = {"content": chunk["text"]} if chunk["text"] else {}
                        yield _sse(chat_chunk(request_id, model, created, delta, reason))
            else:
                if body.include_usage:
                    yield _sse(usage_chunk(request_id, model, created, obj, result))
            finished = True
            yield b"data: [DONE]\n\n"
        finally:
            release(result)
            if not finished:  # client went away: stop generating
                stream.cancel()
            metrics.request_done(job["tenant"], route, 200 if finished else 499, time.perf_counter() - started)
            logger.info("request_id=%s tenant=%s route=%s stream adapter=%s tokens=%d seconds=%.3f finished=%s",
                        request_id, job["tenant"], route, adapter, result.completion_tokens,
                        time.perf_counter() - started, finished)


class ClosingStream(StreamingResponse):
    """A streamed response that closes its body and then calls ``on_close`` however its sending ends.
    Starlette leaves a body whose client went away suspended, so its own ``finally`` (which frees the
    tenant's slot and settles its tokens to what it generated) would run only when the response is
    collected; closing it here runs that now. A body that never started (the client left before the
    first byte) has no ``finally`` to run: ``on_close`` covers it, and must be harmless after the body's
    own cleanup (``release`` acts once; cancelling a finished stream is a no-op)."""

    def __init__(self, content, on_close: Callable[[], Any], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self._on_close()


def _sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _worst_case(job: dict[str, Any], max_model_len: int | None) -> int:
    """The most tokens ``job`` can use: its max_tokens plus a bound on its prompt, which the ingress does
    not tokenise: the prompt's token ids, or its text's UTF-8 bytes (a byte-level BPE token spans at
    least one byte; the few tokens a chat template adds per message are charged at settlement). The
    engine never goes past ``max_model_len`` (prompt + completion), when it is set."""
    prompt = job.get("prompt")
    if isinstance(prompt, list):
        prompt_tokens = len(prompt)
    else:
        text = prompt if prompt is not None else "".join(m["content"] for m in job["messages"])
        prompt_tokens = len(text.encode("utf-8", "surrogatepass"))
    tokens = job["options"]["max_tokens"] + prompt_tokens
    return min(tokens, max_model_len) if max_model_len else tokens


def _add(result: Completion, chunk: dict[str, Any]) -> None:
    result.text += chunk["text"]
    result.token_ids.extend(chunk["token_ids"])
    result.prompt_tokens = chunk["prompt_tokens"]
    result.completion_tokens = chunk["completion_tokens"]
    if chunk["finish_reason"] is not None:
        result.finish_reason = chunk["finish_reason"]
