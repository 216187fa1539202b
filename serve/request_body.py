"""Reading a request's body and making it a request model: size limits, hardened JSON, validation.

Every route that takes a body goes through here, so the same input gets the same 400/413 on every
route: :func:`read_body` (413 past a limit, checked on the declared length and while streaming),
:func:`decode_json` (JSON that nothing downstream chokes on), :func:`read_json` (both), and
:func:`parse` (a JSON object into a pydantic model, the first fault named as OpenAI's ``param``).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from pydantic import ValidationError

from serve.api_errors import ApiError
from serve.protocol import validation_message

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
