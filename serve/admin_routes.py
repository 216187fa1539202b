"""The admin routes (``/v1/admin/...``, the admin key only): tenants, their keys, records, training,
imports, and the replicas' view.

:class:`AdminRoutes` is a base class of ``Ingress`` (:mod:`serve.ingress`). An import's body is
decoded by :mod:`serve.import_body`; the work (training, checking and importing an adapter) is the
erasure backend's (:mod:`serve.backend`), and every replica hears of a new HEAD from the board.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from serve.api_errors import ApiError, tenant_error
from serve.http_app import app
from serve.import_body import ImportBody, parse_import
from serve.request_body import decode_json, parse, read_body, read_json

logger = logging.getLogger(__name__)


class AdminRoutes:
    """What only the admin key may do (a base class of ``Ingress``, after ``IngressAuth``)."""

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
