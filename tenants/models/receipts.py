"""Receipts: the ledger entry of one erasure request, its status machine and the versions it produced."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator

from tenants.errors import InvalidTransitionError
from tenants.models.base import _Model, utcnow
from tenants.models.requests import _STORED_REQUEST, ErasureRequest


class ReceiptStatus(str, enum.Enum):
    """Where an erasure request stands. Terminal: published, rejected."""

    pending = "pending"
    running = "running"
    published = "published"
    failed = "failed"
    rejected = "rejected"


# pending -> running -> published | failed | rejected; running -> pending re-queues a request
# whose coordinator died; failed -> pending retries it (an operator's decision).
ALLOWED_TRANSITIONS: dict[ReceiptStatus, frozenset[ReceiptStatus]] = {
    ReceiptStatus.pending: frozenset({ReceiptStatus.running, ReceiptStatus.rejected, ReceiptStatus.failed}),
    ReceiptStatus.running: frozenset(
        {ReceiptStatus.published, ReceiptStatus.failed, ReceiptStatus.rejected, ReceiptStatus.pending}
    ),
    ReceiptStatus.failed: frozenset({ReceiptStatus.pending}),
    ReceiptStatus.published: frozenset(),
    ReceiptStatus.rejected: frozenset(),
}
_STATUS_TIMESTAMP = {
    ReceiptStatus.running: "started_at",
    ReceiptStatus.published: "published_at",
    ReceiptStatus.failed: "failed_at",
    ReceiptStatus.rejected: "rejected_at",
}

ErasurePath = Literal["influence", "influence+remediation", "retrain"]


class PurgeEntry(_Model):
    """One superseded version deleted by purge."""

    kind: Literal["adapter", "data", "adapter-partial", "data-partial"] = Field(
        description="what was deleted; '-partial' = an upload that never committed"
    )
    version: str = Field(description="the version deleted, e.g. v000003 or d000003")
    key: str = Field(description="the S3 key prefix that was deleted")
    objects: int = Field(0, ge=0, description="number of objects deleted under that prefix")
    request_ids: list[str] = Field(default_factory=list, description="published erasures whose records it held")
    deleted_at: datetime = Field(description="when it was deleted (UTC)")


class CompletionCheck(_Model):
    """One condition of a complete erasure, as it was checked."""

    ok: bool = Field(description="whether the condition held when checked")
    detail: str = Field(description="what was read and what was found (versions and counts, never record ids)")


class Completion(_Model):
    """The last check of whether an erasure is complete (``tenants.completion``)."""

    checked_at: datetime = Field(description="when the checks ran (UTC)")
    records_gone: CompletionCheck = Field(
        description="HEAD's dataset holds none of the removed records, and each corrected one holds its replacement")
    versions_purged: CompletionCheck = Field(
        description="no committed version lacking the erasure in its lineage is left, nor a hidden copy on a "
        "versioned bucket")
    replicas_switched: CompletionCheck = Field(
        description="replicas_switched_at is set, or no serving hook is registered (said so)")

    @property
    def ok(self) -> bool:
        return self.records_gone.ok and self.versions_purged.ok and self.replicas_switched.ok


class Receipt(_Model):
    """The ledger entry of one erasure request: the request, its status and the evidence."""

    request: ErasureRequest = Field(description="the request as submitted")

    @field_validator("request", mode="wrap")
    @classmethod
    def _stored_request(cls, value: Any, handler: Any) -> ErasureRequest:
        if isinstance(value, ErasureRequest):
            return handler(value)
        token = _STORED_REQUEST.set(True)
        try:
            return handler(value)
        finally:
            _STORED_REQUEST.reset(token)
    status: ReceiptStatus = Field(ReceiptStatus.pending, description="pending|running|published|failed|rejected")
    created_at: datetime = Field(default_factory=utcnow, description="when the request was recorded")
    updated_at: datetime = Field(default_factory=utcnow, description="last change of this receipt")
    started_at: datetime | None = Field(None, description="when it entered 'running'")
    published_at: datetime | None = Field(None, description="when its adapter went live (HEAD moved)")
    failed_at: datetime | None = Field(None, description="when it entered 'failed'")
    rejected_at: datetime | None = Field(None, description="when it entered 'rejected'")
    old_adapter_version: str | None = Field(None, description="HEAD's adapter before the erasure")
    new_adapter_version: str | None = Field(None, description="adapter version published by the erasure")
    old_data_version: str | None = Field(None, description="HEAD's data version before the erasure")
    new_data_version: str | None = Field(None, description="data version without the erased records")
    records_affected: list[str] = Field(default_factory=list, description="ids of the records removed or edited")
    solver: dict[str, Any] = Field(default_factory=dict, description="solver report (iterations, residual, damping, wall time)")
    checks: dict[str, Any] = Field(default_factory=dict, description="fidelity checks (losses before/after, membership test)")
    path: ErasurePath | None = Field(None, description="what produced the adapter: influence | influence+remediation | retrain")
    stages: dict[str, float] = Field(default_factory=dict, description="seconds spent per stage")
    purged: list[PurgeEntry] = Field(default_factory=list, description="superseded versions deleted and when")
    replicas_switched_at: datetime | None = Field(None, description="when every serving replica dropped the old adapter")
    completed_at: datetime | None = Field(
        None, description="when the erasure was verified complete: every check of 'completion' held ('published' "
        "only says the adapter is live)")
    completion: Completion | None = Field(None, description="the last completeness check: each condition and what it found")
    error: str | None = Field(None, description="why it failed or was rejected")
    redacted_at: datetime | None = Field(
        None, description="when subject names, record ids, replacement text and the error were replaced by "
        "digests (retention: StoreSettings.receipt_redact_after_seconds after the request ended)")
    lease_token: int | None = Field(
        None, description="fencing token of the coordinator lease under which the receipt last changed")
    attempts: list[dict[str, Any]] = Field(
        default_factory=list, description="failed attempts retried by the reconciler: {at, error, retry_at}")

    _etag: str | None = PrivateAttr(None)

    @property
    def tenant(self) -> str:
        return self.request.tenant

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def terminal(self) -> bool:
        return not ALLOWED_TRANSITIONS[self.status]

    def transition(self, new_status: ReceiptStatus | str, **fields: Any) -> Receipt:
        """Move to ``new_status`` (InvalidTransitionError if not allowed), set ``fields``, stamp times.

        Mutates and returns ``self``.
        """
        new_status = ReceiptStatus(new_status)
        if new_status not in ALLOWED_TRANSITIONS[self.status]:
            raise InvalidTransitionError(
                f"request {self.request_id!r} of tenant {self.tenant!r}: cannot go from "
                f"{self.status.value!r} to {new_status.value!r}"
            )
        now = utcnow()
        self.update(**fields)
        self.status = new_status
        stamp = _STATUS_TIMESTAMP.get(new_status)
        if stamp and stamp not in fields:
            setattr(self, stamp, now)
        self.updated_at = now
        return self

    def update(self, **fields: Any) -> Receipt:
        """Set fields (validated) without changing the status; stamps ``updated_at``. Returns ``self``."""
        for name in ("status", "request", "created_at"):
            if name in fields:
                raise InvalidTransitionError(f"receipt field {name!r} cannot be set by update()")
        for name, value in fields.items():
            if name not in type(self).model_fields:
                raise InvalidTransitionError(f"receipt has no field {name!r}")
            setattr(self, name, value)
        self.updated_at = utcnow()
        return self
