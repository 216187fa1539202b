"""The FastAPI application of the ingress and its exception handlers.

Its own module because every route module (:mod:`serve.openai_routes`, :mod:`serve.tenant_routes`,
:mod:`serve.admin_routes`) decorates its methods with ``@app.get``/``@app.post`` at import, and
:mod:`serve.ingress` imports those modules to assemble ``Ingress``: ``app`` cannot live in any of them.
``serve.ingress(app)(Ingress)`` (in :mod:`serve.app`) binds the routes to the deployment's instance;
the handlers below give every error, ours or FastAPI's, OpenAI's shape.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.api_errors import ApiError, error_response

logger = logging.getLogger(__name__)

# redirect_slashes off: "/v1/tenants/beta/" is a 404 like any unknown route, not a 307 to another one
app = FastAPI(title="eraser", description="OpenAI-compatible serving of tenant LoRA adapters, with erasure",
              redirect_slashes=False)


@app.exception_handler(ApiError)
async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return error_response(error)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    message = {404: f"no route {request.method} {request.url.path}", 405: f"method {request.method} not allowed"}
    return error_response(ApiError(error.status_code, message.get(error.status_code, str(error.detail))))


@app.exception_handler(Exception)
async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    logger.error("%s %s failed: %s", request.method, request.url.path, type(error).__name__, exc_info=error)
    return error_response(ApiError(500, "internal error; retry later", "internal_error"))


@app.exception_handler(RequestValidationError)
async def _fastapi_validation(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0] if error.errors() else {}
    return error_response(ApiError(400, f"invalid request: {first.get('msg', error)}"))
