"""What every model shares: the pydantic base (``extra="forbid"``), UTC time, the producer stamp, subject folding."""

from __future__ import annotations

import unicodedata
from datetime import datetime, timezone
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

from tenants.paths import (
    validate_adapter_version,
    validate_data_version,
    validate_request_id,
    validate_tenant_name,
)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def producer_version() -> str:
    """``llm-eraser-service <version>``: stamped on every artifact the store writes."""
    try:
        from importlib.metadata import version

        return f"llm-eraser-service {version('llm-eraser-service')}"
    except Exception:  # not installed (source checkout): still say who wrote it
        return "llm-eraser-service unknown"


class _Model(BaseModel):
    # allow_inf_nan=False: ``lr: Infinity`` (Python's json accepts it) is refused, not trained with
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# The names S3 keys are built from, checked wherever a model holds one (tenants.paths says what is valid).
TenantName = Annotated[str, AfterValidator(validate_tenant_name)]
RequestId = Annotated[str, AfterValidator(validate_request_id)]
AdapterVersion = Annotated[str, AfterValidator(validate_adapter_version)]
DataVersion = Annotated[str, AfterValidator(validate_data_version)]


def normalize_subject(subject: str) -> str:
    """The form subjects are compared in: NFC, case-folded, whitespace runs as one space, trimmed.

    "John Smith", "john smith", "John  Smith " and an NFD "Jos\u0065\u0301" all select the same records.
    """
    folded = unicodedata.normalize("NFC", subject).casefold()
    return unicodedata.normalize("NFC", " ".join(folded.split()))
