"""Everything persisted or sent across Ray/HTTP: records, requests, receipts, configs, manifests.

Pydantic v2 models, ``extra="forbid"``, one description per field. JSON round-trips exactly
(``model_dump_json`` / ``model_validate_json``); timestamps are timezone-aware UTC.

One module per concept: ``requests`` (records and erasure requests), ``receipts`` (the ledger entry
and its status machine), ``config`` (tenant.json: LoRA, training recipe, key hashes), ``manifests``
(HEAD and what each version commits); ``base`` holds what they share. Every name stays importable
from here.
"""

from tenants.models.base import normalize_subject, producer_version, utcnow
from tenants.models.config import DEFAULT_TARGET_MODULES, KeyHash, LoraRecipe, TenantConfig, TrainingRecipe
from tenants.models.manifests import AdapterManifest, DataManifest, Head, ModelManifest, ShardInfo
from tenants.models.receipts import (ALLOWED_TRANSITIONS, Completion, CompletionCheck, ErasurePath, PurgeEntry, Receipt,
                                     ReceiptStatus)
from tenants.models.requests import ChatMessage, ErasureKind, ErasureRequest, Record, Replacement, content_id

__all__ = [
    "ALLOWED_TRANSITIONS",
    "DEFAULT_TARGET_MODULES",
    "AdapterManifest",
    "ChatMessage",
    "Completion",
    "CompletionCheck",
    "DataManifest",
    "ErasureKind",
    "ErasurePath",
    "ErasureRequest",
    "Head",
    "KeyHash",
    "LoraRecipe",
    "ModelManifest",
    "PurgeEntry",
    "Receipt",
    "ReceiptStatus",
    "Record",
    "Replacement",
    "ShardInfo",
    "TenantConfig",
    "TrainingRecipe",
    "content_id",
    "normalize_subject",
    "producer_version",
    "utcnow",
]
