"""The body of ``POST /v1/admin/tenants/{tenant}/import``, decoded and checked before anything is written.

An import carries a whole tenant in one JSON body: a PEFT adapter (config, base64 weights), the
records it was trained on, a held-out reference and an optional recipe. :func:`parse_import` turns it
into an :class:`ImportBody` or a 400 naming the field at fault (a record: its line), so the route in
:mod:`serve.admin_routes` deals only with the store and the erasure backend.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from serve.api_errors import ApiError
from serve.request_body import decode_json

IMPORT_FIELDS = {"base_model", "adapter", "records", "reference", "recipe"}
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass(frozen=True)
class ImportBody:
    """The parts of an import request, decoded (see ``AdminRoutes.admin_import_tenant``)."""

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
