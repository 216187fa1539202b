"""The HTTP ingress: OpenAI-compatible routes, erasure routes, admin routes (FastAPI on Ray Serve).

Authentication: ``Authorization: Bearer <key>``. A tenant key reaches that tenant's model (its name)
and its erasures only; the admin key reaches the admin routes and every tenant's erasure routes.
Errors always have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve import metrics
from serve.backend import BackendContext, load_backend
from serve.board import ALL, SwitchNotifier
from serve.config import ServeConfig
from serve.engine import Completion
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
    validation_message,
)

logger = logging.getLogger(__name__)

# redirect_slashes off: "/v1/tenants/beta/" is a 404 like any unknown route, not a 307 to another one
app = FastAPI(title="eraser", description="OpenAI-compatible serving of tenant LoRA adapters, with erasure",
              redirect_slashes=False)


class ApiError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def tenant_error(error: Exception) -> ApiError:
    """HTTP status of a ``tenants`` error."""
    from tenants import errors as e

    table: list[tuple[type, int, str]] = [
        (e.AuthError, 401, "invalid_api_key"),
        (e.TenantNotFoundError, 404, "tenant_not_found"),
        (e.ReceiptNotFoundError, 404, "receipt_not_found"),
        (e.VersionNotFoundError, 404, "version_not_found"),
        (e.UnknownRecordError, 400, "unknown_record"),
        (e.InvalidNameError, 400, "invalid_name"),
        (e.InvalidRecordsError, 400, "invalid_records"),
        (e.InvalidRequestError, 400, "invalid_request"),
        (e.InvalidConfigError, 400, "invalid_config"),
        (e.InvalidAdapterError, 400, "invalid_adapter"),
        (e.TenantExistsError, 409, "tenant_exists"),
        (e.ConflictError, 409, "conflict"),
        (e.HeadConflictError, 409, "conflict"),
    ]
    for kind, status, code in table:
        if isinstance(error, kind):
            return ApiError(status, str(error), code)
    return ApiError(503, "the tenant store is unavailable; retry later", "store_unavailable")


def _error_response(error: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(error.status, error.message, error.code, error.param), status_code=error.status,
                        headers=headers)


@app.exception_handler(ApiError)
async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return _error_response(error)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    message = {404: f"no route {request.method} {request.url.path}", 405: f"method {request.method} not allowed"}
    return _error_response(ApiError(error.status_code, message.get(error.status_code, str(error.detail))))


@app.exception_handler(Exception)
async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    logger.error("%s %s failed: %s", request.method, request.url.path, type(error).__name__, exc_info=error)
    return _error_response(ApiError(500, "internal error; retry later", "internal_error"))


@app.exception_handler(RequestValidationError)
async def _fastapi_validation(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0] if error.errors() else {}
    return _error_response(ApiError(400, f"invalid request: {first.get('msg', error)}"))


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if not header:
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", "missing_api_key")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, "malformed Authorization header: expected 'Bearer <key>'", "invalid_api_key")
    return key.strip()


MAX_JSON_DEPTH = 32  # no request of this API nests deeper (an import's PEFT config: 3 levels)
MAX_JSON_INT = 2**64  # larger integers (seeds, token ids, counts) mean nothing here and break the engine


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def decode_json(raw: bytes | str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """JSON text as Python values, refusing what Python's ``json`` accepts but nothing downstream can
    take: NaN/Infinity, nesting past ``max_depth``, integers beyond 2^64, lone UTF-16 surrogates
    (``"\\ud800"``: not text; encoding it later fails). 400 (``invalid_json``) naming the fault."""
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError(400, f"request body nests deeper than {max_depth} levels", "invalid_json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"request body is not valid JSON: {error}", "invalid_json") from None
    except ValueError as error:  # Infinity/NaN, an integer of more than 4300 digits
        raise ApiError(400, f"request body is not valid JSON: {error}", "invalid_json") from None
    _check_json(value, max_depth)
    return value


def _check_json(value: Any, max_depth: int) -> None:
    """One iterative pass over decoded JSON (no recursion, so any depth is safe to walk)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, bool):
            continue
        elif isinstance(item, int):
            if not -MAX_JSON_INT <= item <= MAX_JSON_INT:
                raise ApiError(400, "request body holds an integer beyond 2^64", "invalid_json")
        elif isinstance(item, (list, dict)):
            if depth > max_depth:
                raise ApiError(400, f"request body nests deeper than {max_depth} levels", "invalid_json")
            if isinstance(item, dict):
                for key, child in item.items():
                    _check_text(key)
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "request body holds a lone UTF-16 surrogate (e.g. \\ud800): not valid Unicode text",
                       "invalid_json") from None


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON: 413 beyond ``limit`` bytes, 400 when it is not JSON (see :func:`decode_json`)."""
    raw = await read_body(request, limit)
    if not raw.strip():
        raise ApiError(400, "request body is empty; expected a JSON object", "invalid_json")
    return decode_json(raw)


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes", "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes", "request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def parse(model, body: Any):
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}", "invalid_json")
    try:
        return model.model_validate(body)
    except ValidationError as error:
        message, param = validation_message(error)
        raise ApiError(400, message, "invalid_request", param) from None


IMPORT_FIELDS = {"base_model", "adapter", "records", "reference", "recipe"}
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass(frozen=True)
class ImportBody:
    """The parts of an import request, decoded (see ``Ingress.admin_import_tenant``)."""

    base_model: str
    peft_config: dict[str, Any]
    files: dict[str, bytes]  # adapter_config.json and adapter_model.safetensors, as they go to disk
    records: list  # tenants.Record
    reference: list  # tenants.Record
    recipe: dict[str, Any] | None


def parse_import(body: Any, default_base: str) -> ImportBody:
    """An import request's body, decoded, or a 400 naming the field at fault (records: its line)."""
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}", "invalid_json")
    unknown = sorted(set(body) - IMPORT_FIELDS)
    if unknown:
        raise ApiError(400, f"unknown field(s) {unknown}; expected {sorted(IMPORT_FIELDS)}", "invalid_request", unknown[0])
    base_model = body.get("base_model", default_base)
    if not isinstance(base_model, str) or not base_model:
        raise ApiError(400, "base_model must be a model name", "invalid_request", "base_model")
    recipe = body.get("recipe")
    if recipe is not None and not isinstance(recipe, dict):
        raise ApiError(400, f"recipe must be a JSON object, got {type(recipe).__name__}", "invalid_request", "recipe")
    peft_config, files = _import_adapter(body.get("adapter"))
    return ImportBody(base_model=base_model, peft_config=peft_config, files=files,
                      records=_import_records(body, "records"), reference=_import_records(body, "reference"),
                      recipe=recipe)


def _import_adapter(adapter: Any) -> tuple[dict[str, Any], dict[str, bytes]]:
    """``adapter``: its PEFT config (an object, or its JSON text) and base64 weights, as files."""
    import base64
    import binascii

    if not isinstance(adapter, dict) or set(adapter) != {ADAPTER_CONFIG, ADAPTER_WEIGHTS}:
        given = sorted(adapter) if isinstance(adapter, dict) else type(adapter).__name__
        raise ApiError(400, f"adapter must be an object with exactly {ADAPTER_CONFIG!r} and {ADAPTER_WEIGHTS!r}, "
                       f"got {given}", "invalid_request", "adapter")
    peft_config = adapter[ADAPTER_CONFIG]
    config_text = peft_config if isinstance(peft_config, str) else json.dumps(peft_config, indent=2)
    if isinstance(peft_config, str):  # stored as given
        try:
            peft_config = decode_json(peft_config)
        except ApiError as error:
            raise ApiError(400, f"adapter.{ADAPTER_CONFIG}: {error.message}", "invalid_request",
                           f"adapter.{ADAPTER_CONFIG}") from None
    if not isinstance(peft_config, dict):
        raise ApiError(400, f"adapter.{ADAPTER_CONFIG} must be a JSON object", "invalid_request", f"adapter.{ADAPTER_CONFIG}")
    try:
        weights = base64.b64decode(adapter[ADAPTER_WEIGHTS], validate=True)
    except (binascii.Error, TypeError, ValueError) as error:
        raise ApiError(400, f"adapter.{ADAPTER_WEIGHTS} must be base64: {error}", "invalid_request",
                       f"adapter.{ADAPTER_WEIGHTS}") from None
    if not weights:
        raise ApiError(400, f"adapter.{ADAPTER_WEIGHTS} is empty", "invalid_request", f"adapter.{ADAPTER_WEIGHTS}")
    return peft_config, {ADAPTER_CONFIG: config_text.encode(), ADAPTER_WEIGHTS: weights}


def _import_records(body: dict[str, Any], field: str) -> list:
    """``body[field]`` (JSON Lines text, or a list of record objects) as records; errors name ``field:line``."""
    from tenants.errors import TenantError
    from tenants.records import parse_jsonl

    value = body.get(field)
    if isinstance(value, str):
        lines = value.splitlines()
    elif isinstance(value, list):
        lines = [json.dumps(item) for item in value]
    else:
        raise ApiError(400, f"{field} must be JSON Lines text or a list of records, got {type(value).__name__}",
                       "invalid_request", field)
    try:
        return list(parse_jsonl(lines, source=field))
    except TenantError as error:
        raise ApiError(400, str(error), "invalid_records", field) from None


def _key_id(api_key: str) -> str | None:
    from tenants.errors import AuthError
    from tenants.keys import parse_key

    try:
        return parse_key(api_key).key_id
    except AuthError:  # ERASER_ADMIN_KEY may have any form
        return None


def _sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class Ingress:
    """Serve ingress deployment class (``serve.ingress(app)`` is applied in :mod:`serve.app`)."""

    def __init__(self, config: ServeConfig, engine, board) -> None:
        from tenants.store import TenantStore

        self.config = config
        self.engine = engine
        self.board = board
        settings = config.store_settings()
        self.store = TenantStore(settings)
        self.notifier = SwitchNotifier(config.app_name, timeout_s=config.switch_timeout_s)
        self.backend = load_backend(config.erasure_backend,
                                    BackendContext(store_settings=settings, notify_switch=self.notifier,
                                                   app_name=config.app_name))
        self._init_guards()
        logger.info("ingress ready: store %s, backend %s", settings.describe(), type(self.backend).__name__)

    # -- auth ---------------------------------------------------------------------------------

    def _init_guards(self) -> None:
        """This replica's key caches, failure counts and per-tenant generation counts (all empty)."""
        self._auth: dict[str, tuple[str, float, str | None]] = {}  # sha256(key) -> (principal, expiry, key id)
        self._failed: dict[str, float] = {}  # sha256(key) -> refused without a check until then
        self._failures: dict[str, collections.deque] = {}  # client address -> times of its failed keys
        self._key_epoch: int | None = None  # the board's revocation epoch seen; None: not watching
        self._revocation_watcher: asyncio.Task | None = None
        self._running: dict[str, int] = {}  # tenant -> generations in flight on this replica

    async def _principal(self, request: Request) -> str | None:
        """'tenant:<name>' or 'admin' for the request's valid key, None otherwise.

        A verified key is trusted for ``auth_cache_s`` (dropped at once when the board reports its
        revocation); a failed one is refused for ``auth_negative_cache_s`` without an S3 read or a
        scrypt; a client address past ``auth_failures_per_minute`` failures gets 429 for any key not
        already trusted.
        """
        from tenants.errors import AuthError, TenantError

        key = _bearer(request)
        client = request.client.host if request.client else "?"
        digest = hashlib.sha256(key.encode()).hexdigest()
        now = time.monotonic()
        cached = self._auth.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        self._watch_revocations()
        if self._failed.get(digest, 0.0) > now:
            self._count_failure(client, now)
            return None
        failures = self._failures.get(client)
        if failures and len(failures) >= self.config.auth_failures_per_minute and now - failures[0] < 60.0:
            retry = max(1, int(60.0 - (now - failures[0])) + 1)
            raise ApiError(429, f"too many failed API key attempts from this address; retry in {retry} s",
                           "too_many_failed_keys")
        epoch = self._key_epoch
        try:
            principal = f"tenant:{await asyncio.to_thread(self.store.authenticate, key)}"
        except AuthError:
            principal = "admin" if await asyncio.to_thread(self.store.verify_admin, key) else None
        except TenantError as error:
            raise tenant_error(error) from None
        if principal is None:
            self._count_failure(client, now)
            if self.config.auth_negative_cache_s > 0:
                if len(self._failed) > 100_000:
                    self._failed.clear()
                self._failed[digest] = now + self.config.auth_negative_cache_s
            return None
        # trusted only while revocations are being watched, and none came in during the check
        if self.config.auth_cache_s > 0 and epoch is not None and epoch == self._key_epoch:
            if len(self._auth) > 10_000:
                self._auth.clear()
            self._auth[digest] = (principal, now + self.config.auth_cache_s, _key_id(key))
        return principal

    def _count_failure(self, client: str, now: float) -> None:
        failures = self._failures.setdefault(client, collections.deque())
        while failures and now - failures[0] >= 60.0:
            failures.popleft()
        failures.append(now)
        while len(failures) > self.config.auth_failures_per_minute:
            failures.popleft()
        if len(self._failures) > 100_000:
            self._failures.clear()

    def _watch_revocations(self) -> None:
        """Start the long-poll of the board's key revocations (once, on this replica's event loop)."""
        if self._revocation_watcher is None or self._revocation_watcher.done():
            self._revocation_watcher = asyncio.get_running_loop().create_task(self._revocations())

    async def _revocations(self) -> None:
        since = -1
        while True:
            try:
                epoch, revoked = await self.board.watch_keys.remote(since)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # no board: nothing is trusted without a check until it is back
                logger.warning("ingress: adapter board unreachable for key revocations (%s)", error)
                self._key_epoch, since = None, -1
                self._auth.clear()
                await asyncio.sleep(1.0)
                continue
            self._forget(revoked)
            self._key_epoch = since = epoch

    def _forget(self, revoked: list[list[str]]) -> None:
        """Drop trusted keys that were revoked (``["*", "*"]``: all of them)."""
        for tenant, key_id in revoked:
            for digest, (principal, _, cached_key) in list(self._auth.items()):
                if tenant == ALL or (principal == f"tenant:{tenant}" and cached_key == key_id):
                    self._auth.pop(digest, None)
        if revoked:
            logger.info("ingress: forgot %d revoked API key(s)", len(revoked))

    async def __del__(self) -> None:
        if self._revocation_watcher is not None:
            self._revocation_watcher.cancel()

    async def _tenant_key(self, request: Request) -> str:
        """The tenant of the request's key (401 for no key, a bad key, or the admin key)."""
        principal = await self._principal(request)
        if principal is None:
            raise ApiError(401, "invalid API key", "invalid_api_key")
        if principal == "admin":
            raise ApiError(403, "the admin key has no model; use a tenant's API key", "permission_denied")
        return principal.split(":", 1)[1]

    async def _allow_tenant(self, request: Request, tenant: str) -> str:
        """'tenant' or 'admin' when the key may act on ``tenant``: 401 bad key, 403 another tenant's."""
        principal = await self._principal(request)
        if principal is None:
            raise ApiError(401, "invalid API key", "invalid_api_key")
        if principal == "admin":
            return "admin"
        if principal != f"tenant:{tenant}":
            raise ApiError(403, f"this API key does not grant access to tenant {tenant!r}", "permission_denied")
        return "tenant"

    async def _admin(self, request: Request) -> None:
        principal = await self._principal(request)
        if principal is None:
            raise ApiError(401, "invalid API key", "invalid_api_key")
        if principal != "admin":
            raise ApiError(403, "this route needs the admin key", "permission_denied")

    async def _store(self, method: str, *args: Any, **kwargs: Any) -> Any:
        from tenants.errors import TenantError

        try:
            return await asyncio.to_thread(getattr(self.store, method), *args, **kwargs)
        except TenantError as error:
            raise tenant_error(error) from None

    # -- OpenAI routes ------------------------------------------------------------------------

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
        generations at once (429 beyond), so one tenant cannot fill the engine queues for all."""
        tenant, limit = job["tenant"], self.config.max_concurrent_per_tenant
        running = self._running.get(tenant, 0)
        if running >= limit:
            metrics.request_done(tenant, route, 429, time.perf_counter() - started)
            raise ApiError(429, f"model {tenant!r} has {running} requests running on this replica, its limit; "
                           "retry later", "tenant_concurrency_limit")
        self._running[tenant] = running + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._running[tenant] -= 1

        try:
            response = await self._respond(request, job, body, route, started, release)
        except BaseException:
            release()
            raise
        if not isinstance(response, StreamingResponse):
            release()
        return response  # a stream releases when it ends (its generator's finally)

    def _job(self, request: Request, tenant: str, body, max_tokens: int | None, **prompt: Any) -> dict[str, Any]:
        limit = self.config.max_tokens_limit
        if max_tokens is not None and max_tokens > limit:
            raise ApiError(400, f"max_tokens {max_tokens} exceeds this service's limit of {limit}", "invalid_request",
                           "max_tokens")
        options = body.sampling(max_tokens if max_tokens is not None else limit)
        request_id = request.headers.get("x-request-id") or new_id("cmpl")
        return {"tenant": tenant, "request_id": request_id, "options": asdict(options), **prompt}

    async def _respond(self, request: Request, job: dict[str, Any], body, route: str, started: float,
                       release=lambda: None):
        tenant, request_id = job["tenant"], job["request_id"]
        stream = self.engine.options(stream=True).generate.remote(job)
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
            return StreamingResponse(self._sse(stream, job, body, route, created, started, first["adapter"], release),
                                     media_type="text/event-stream", headers=headers)
        result = Completion()
        async for item in stream:
            if "error" in item:
                raise ApiError(item["error"]["status"], item["error"]["message"], item["error"]["code"])
            _add(result, item["chunk"])
        builder = completion_body if route == "completions" else chat_body
        metrics.request_done(tenant, route, 200, time.perf_counter() - started)
        logger.info("request_id=%s tenant=%s route=%s adapter=%s tokens=%d seconds=%.3f", request_id, tenant, route,
                    first["adapter"], result.completion_tokens, time.perf_counter() - started)
        return JSONResponse(builder(request_id, body.model, result, created), headers=headers)

    async def _sse(self, stream, job, body, route: str, created: int, started: float,
                   adapter: str, release=lambda: None) -> AsyncIterator[bytes]:
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
            release()
            if not finished:  # client went away: stop generating
                stream.cancel()
            metrics.request_done(job["tenant"], route, 200 if finished else 499, time.perf_counter() - started)
            logger.info("request_id=%s tenant=%s route=%s stream adapter=%s tokens=%d seconds=%.3f finished=%s",
                        request_id, job["tenant"], route, adapter, result.completion_tokens,
                        time.perf_counter() - started, finished)

    # -- erasure routes -----------------------------------------------------------------------

    @app.post("/v1/tenants/{tenant}/erasures")
    async def submit_erasure(self, tenant: str, request: Request) -> JSONResponse:
        from tenants.models import ErasureRequest

        await self._allow_tenant(request, tenant)
        body = await read_json(request, self.config.max_body_bytes)
        if isinstance(body, dict):
            if body.setdefault("tenant", tenant) != tenant:
                raise ApiError(400, f"body names tenant {body['tenant']!r} but the URL names {tenant!r}",
                               "invalid_request", "tenant")
            limit = self.config.max_erasure_ids
            for field in ("records", "subjects", "replacements"):
                if isinstance(body.get(field), (list, dict)) and len(body[field]) > limit:
                    raise ApiError(400, f"{field}: {len(body[field])} entries; one request selects at most {limit} "
                                   "(split it, or raise max_erasure_ids)", "too_many_records", field)
        erasure = parse(ErasureRequest, body)
        receipt, created = await self._store("submit_erasure", erasure)
        url = f"/v1/tenants/{tenant}/erasures/{erasure.request_id}"
        if created:
            try:
                await asyncio.to_thread(self.backend.submit, receipt)
            except Exception:
                logger.exception("tenant=%s request_id=%s backend did not accept the erasure; it stays pending",
                                 tenant, erasure.request_id)
        logger.info("tenant=%s request_id=%s erasure %s (%s)", tenant, erasure.request_id,
                    "recorded" if created else "repeated", erasure.kind)
        return JSONResponse({"receipt_url": url, "created": created, "receipt": receipt.model_dump(mode="json")},
                            status_code=202 if created else 200, headers={"location": url})

    @app.get("/v1/tenants/{tenant}/erasures/{request_id}")
    async def get_erasure(self, tenant: str, request_id: str, request: Request) -> dict[str, Any]:
        await self._allow_tenant(request, tenant)
        receipt = await self._store("get_receipt", tenant, request_id)
        return receipt.model_dump(mode="json")

    @app.get("/v1/tenants/{tenant}")
    async def get_tenant(self, tenant: str, request: Request) -> dict[str, Any]:
        await self._allow_tenant(request, tenant)
        config = await self._store("get_tenant", tenant)
        head, _ = await self._store("get_head", tenant)
        return {"tenant": tenant, "model": tenant,
                "adapter_version": head.adapter if head else None, "data_version": head.data if head else None,
                "head_updated_at": head.updated_at.isoformat() if head and head.updated_at else None,
                "config": config.public()}

    # -- admin routes -------------------------------------------------------------------------

    @app.get("/v1/admin/tenants")
    async def admin_list_tenants(self, request: Request) -> dict[str, Any]:
        await self._admin(request)
        return {"tenants": await self._store("list_tenants")}

    @app.post("/v1/admin/tenants")
    async def admin_create_tenant(self, request: Request) -> JSONResponse:
        from tenants.models import TenantConfig

        await self._admin(request)
        body = await read_json(request, self.config.max_body_bytes)
        if isinstance(body, dict):
            body.setdefault("base_model", self.config.engine.model)
            if "key_hashes" in body:
                raise ApiError(400, "key_hashes cannot be set; keys are issued by the service", "invalid_request")
        config = parse(TenantConfig, body)
        self._check_rank(config)
        await self._store("create_tenant", config)
        api_key = await self._store("issue_key", config.name, "created by admin")
        return JSONResponse({"tenant": config.public(), "api_key": api_key}, status_code=201)

    def _check_rank(self, config) -> None:
        """400 for a LoRA rank the engine cannot serve (vLLM refuses it at load: the tenant would get 503s)."""
        limit = self.config.engine.max_lora_rank
        if config.lora.rank > limit:
            raise ApiError(400, f"LoRA rank {config.lora.rank} exceeds the engine's max_lora_rank {limit}; this "
                           "service cannot serve the adapter", "lora_rank_too_large", "lora.rank")

    @app.post("/v1/admin/tenants/{tenant}/keys")
    async def admin_issue_key(self, tenant: str, request: Request) -> JSONResponse:
        await self._admin(request)
        return JSONResponse({"tenant": tenant, "api_key": await self._store("issue_key", tenant, "issued by admin")},
                            status_code=201)

    @app.delete("/v1/admin/tenants/{tenant}/keys/{key_id}")
    async def admin_revoke_key(self, tenant: str, key_id: str, request: Request) -> dict[str, Any]:
        """Revoke a tenant's key: removed from the store, then forgotten by every ingress replica (the
        board tells them at once; a replica that cannot reach the board trusts no key without a check)."""
        await self._admin(request)
        if not await self._store("revoke_key", tenant, key_id):
            raise ApiError(404, f"tenant {tenant!r} has no API key {key_id!r}", "key_not_found", "key_id")
        self._forget([[tenant, key_id]])
        try:
            epoch = await self.board.revoke_key.remote(tenant, key_id)
        except Exception as error:  # replicas' caches expire within auth_cache_s
            logger.warning("tenant=%s key %s revoked in the store; replicas not told: %s", tenant, key_id, error)
            epoch = None
        logger.info("tenant=%s API key %s revoked", tenant, key_id)
        return {"tenant": tenant, "key_id": key_id, "revoked": True, "replicas_told": epoch is not None}

    @app.post("/v1/admin/tenants/{tenant}/records")
    async def admin_upload_records(self, tenant: str, request: Request) -> JSONResponse:
        """Records as JSON Lines (or a JSON object ``{"records": [...]}``) -> a new data version."""
        from tenants.records import parse_jsonl

        await self._admin(request)
        raw = await read_body(request, self.config.max_upload_bytes)
        if request.headers.get("content-type", "").split(";")[0].strip() == "application/json":
            try:
                records = decode_json(raw)["records"]
            except (TypeError, KeyError) as error:
                raise ApiError(400, f"expected a JSON object {{\"records\": [...]}}: {error}", "invalid_json") from None
        else:
            records = parse_jsonl(raw.splitlines(), source="request body")
        version = await self._store("put_dataset", tenant, records)
        return JSONResponse({"tenant": tenant, "data_version": version}, status_code=201)

    @app.post("/v1/admin/tenants/{tenant}/train")
    async def admin_train(self, tenant: str, request: Request) -> JSONResponse:
        await self._admin(request)
        body = await read_json(request, self.config.max_body_bytes) if int(request.headers.get("content-length") or 0) \
            else {}
        await self._store("get_tenant", tenant)
        try:
            job = await asyncio.to_thread(self.backend.train, tenant, (body or {}).get("data_version"))
        except NotImplementedError as error:
            raise ApiError(501, str(error), "not_implemented") from None
        return JSONResponse({"tenant": tenant, "job": job}, status_code=202)

    @app.post("/v1/admin/tenants/{tenant}/import")
    async def admin_import_tenant(self, tenant: str, request: Request) -> JSONResponse:
        """Import an adapter trained elsewhere as a new tenant: ``eraser tenants import`` over HTTP.

        Body, JSON, at most ``max_upload_bytes``::

            {"base_model": "<model name under models/>",          default: the served model
             "adapter": {"adapter_config.json": {...},             the PEFT config (an object, or its text)
                         "adapter_model.safetensors": "<base64>"},
             "records": "<JSON Lines>" | [{...}, ...],             the records the adapter was trained on
             "reference": "<JSON Lines>" | [{...}, ...],           records of the same kind it never saw
             "recipe": {"epochs": 3, "lr": 2e-4, "batch_size": 8, ...}}   optional: the training recipe

        The tenant gets adapter version 1 (``path: "import"``), data version 1 (the records, then the
        reference flagged ``heldout``) and HEAD on them, and an API key (in the response, shown once).
        Without a training recipe (epochs, lr and batch_size) it has no exact-retrain fallback; the
        response's ``retrain_fallback`` says so. The adapter is checked against its base by the cluster
        layer (the erasure backend) before anything is written, so every refusal writes nothing: 400 for
        a bad body, records (line and field named), a reference that is empty or overlaps the records,
        an adapter that does not fit the base or uses unsupported features, or a bad recipe; 409 if the
        tenant exists; 413 past the size limit; 501 without a cluster erasure backend.
        """
        from tenants.errors import TenantError
        from tenants.paths import validate_tenant_name
        from tenants.store import imported_config

        await self._admin(request)
        body = await read_json(request, self.config.max_upload_bytes)
        parts = parse_import(body, self.config.engine.model)
        try:
            config = imported_config(validate_tenant_name(tenant), parts.base_model, parts.peft_config, parts.recipe)
        except TenantError as error:
            raise tenant_error(error) from None
        self._check_rank(config)
        head = await self._import(config, parts)
        api_key = await self._store("issue_key", tenant, "created by import")
        try:  # replicas poll HEAD too; this only makes the new tenant servable at once
            self.board.publish.remote(tenant, head.adapter, self.config.switch_timeout_s)
        except Exception as error:
            logger.warning("tenant=%s imported; replicas not told (they poll HEAD): %s", tenant, error)
        logger.info("tenant=%s imported: adapter %s, data %s", tenant, head.adapter, head.data)
        return JSONResponse({"tenant": config.public(), "head": head.model_dump(mode="json"), "api_key": api_key,
                             "retrain_fallback": config.retrain_unavailable() or "available"}, status_code=201)

    async def _import(self, config, parts: ImportBody):
        """The backend's import (it checks the adapter with the method, then the store writes), the
        adapter's files in a temporary directory for the call's duration."""
        import shutil
        import tempfile
        from pathlib import Path

        from tenants.errors import TenantError

        workdir = Path(tempfile.mkdtemp(prefix="eraser-import-"))
        try:
            for name, content in parts.files.items():
                (workdir / name).write_bytes(content)
            return await asyncio.to_thread(self.backend.import_tenant, config, workdir, parts.records,
                                           parts.reference, "http")
        except TenantError as error:
            raise tenant_error(error) from None
        except NotImplementedError as error:
            raise ApiError(501, str(error), "not_implemented") from None
        except Exception as error:
            logger.exception("tenant=%s import failed", config.name)
            raise ApiError(500, f"import failed: {error}", "import_failed") from None
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    @app.post("/v1/admin/tenants/{tenant}/refresh")
    async def admin_refresh(self, tenant: str, request: Request) -> dict[str, Any]:
        """Make every replica switch to the tenant's HEAD now; returns the board's switch report."""
        await self._admin(request)
        head, _ = await self._store("get_head", tenant)
        return await self.board.publish.remote(tenant, head.adapter if head else None, self.config.switch_timeout_s)

    @app.get("/v1/admin/replicas")
    async def admin_replicas(self, request: Request) -> dict[str, Any]:
        """The board's view, and what one engine replica holds (its adapters, LoRA ids, files)."""
        await self._admin(request)
        return {"board": await self.board.status.remote(), "engine": await self.engine.inspect.remote()}

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}


def _add(result: Completion, chunk: dict[str, Any]) -> None:
    result.text += chunk["text"]
    result.token_ids.extend(chunk["token_ids"])
    result.prompt_tokens = chunk["prompt_tokens"]
    result.completion_tokens = chunk["completion_tokens"]
    if chunk["finish_reason"] is not None:
        result.finish_reason = chunk["finish_reason"]
