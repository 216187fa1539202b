"""The ingress's one error type, :class:`ApiError`, and how a ``tenants`` error becomes one.

Every refusal of the HTTP API is an ``ApiError`` raised anywhere below a route; the handlers in
:mod:`serve.http_app` turn it into OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``
(:func:`serve.protocol.error_body`). Kept apart from the routes so that body parsing
(:mod:`serve.request_body`, :mod:`serve.import_body`) can raise it without importing FastAPI routes.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from serve.protocol import error_body


class ApiError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers  # sent with the error (a 429's Retry-After)


# HTTP status -> {tenants.errors class name: error code}. No class here subclasses another, so the
# order does not matter; any other TenantError (S3 down, a lease lost, ...) is a 503.
TENANT_ERRORS: dict[int, dict[str, str]] = {
    401: {"AuthError": "invalid_api_key"},
    404: {"TenantNotFoundError": "tenant_not_found", "ReceiptNotFoundError": "receipt_not_found",
          "VersionNotFoundError": "version_not_found"},
    400: {"UnknownRecordError": "unknown_record", "InvalidNameError": "invalid_name",
          "InvalidRecordsError": "invalid_records", "InvalidRequestError": "invalid_request",
          "InvalidConfigError": "invalid_config", "InvalidAdapterError": "invalid_adapter"},
    409: {"TenantExistsError": "tenant_exists", "ConflictError": "conflict", "HeadConflictError": "conflict"},
}


def tenant_error(error: Exception) -> ApiError:
    """HTTP status of a ``tenants`` error."""
    from tenants import errors

    for status, codes in TENANT_ERRORS.items():
        for name, code in codes.items():
            if isinstance(error, getattr(errors, name)):
                return ApiError(status, str(error), code)
    return ApiError(503, "the tenant store is unavailable; retry later", "store_unavailable")


def error_response(error: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    """``error`` as the JSON response OpenAI's clients expect."""
    return JSONResponse(error_body(error.status, error.message, error.code, error.param), status_code=error.status,
                        headers={**(error.headers or {}), **(headers or {})})
