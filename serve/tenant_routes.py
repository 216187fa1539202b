"""The routes of one tenant's data: its erasure requests and their receipts, and its current versions.

:class:`TenantRoutes` is a base class of ``Ingress`` (:mod:`serve.ingress`). A tenant's key reaches
its own tenant, the admin key every tenant. An erasure is recorded in the ledger here (a receipt,
``pending``), then handed to the erasure backend (:mod:`serve.backend`); see
docs/architecture.md#the-erasure-flow.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from serve.api_errors import ApiError
from serve.http_app import app
from serve.request_body import parse, read_json

logger = logging.getLogger(__name__)


class TenantRoutes:
    """Erasures and the tenant's view (a base class of ``Ingress``, after ``IngressAuth``)."""

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
