"""Versions: HEAD and the manifests committed with each adapter, dataset and base model."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from tenants.models.base import AdapterVersion, DataVersion, _Model, producer_version, utcnow
from tenants.models.receipts import ErasurePath


class Head(_Model):
    """``HEAD.json``: the live adapter and data version of a tenant."""

    adapter: AdapterVersion = Field(description="live adapter version")
    data: DataVersion = Field(description="live data version (the records the adapter reflects)")
    updated_at: datetime | None = Field(None, description="when HEAD was moved (makes every HEAD.json distinct)")
    lease_token: int | None = Field(None, description="fencing token of the coordinator lease that moved HEAD")


class AdapterManifest(_Model):
    """``eraser.json`` of an adapter version: what it is, where it came from, how it was checked.

    The store fills ``version``, ``tenant``, ``files``, ``sha256``, ``created_at`` and ``producer``
    on publish; the caller supplies the lineage and evidence.
    """

    version: str | None = Field(None, description="adapter version (allocated by the store on publish)")
    parent_version: str | None = Field(None, description="adapter version it was derived from")
    data_version: str | None = Field(None, description="data version it reflects")
    tenant: str | None = Field(None, description="owning tenant (set by the store)")
    base_model: str | None = Field(None, description="base model it applies to")
    sha256: str | None = Field(None, description="sha256 of adapter_model.safetensors")
    files: dict[str, str] = Field(default_factory=dict, description="file name -> sha256 of every file but eraser.json")
    request_ids: list[str] = Field(default_factory=list, description="erasure requests applied to produce it")
    solver: dict[str, Any] | None = Field(None, description="solver report")
    checks: dict[str, Any] | None = Field(None, description="fidelity checks")
    path: ErasurePath | Literal["train", "import"] | None = Field(
        None, description="how it was produced: train | import (an existing adapter brought in, see "
        "arguments.imported) | influence | influence+remediation | retrain"
    )
    arguments: dict[str, Any] | None = Field(None, description="method arguments used to produce it")
    created_at: datetime = Field(default_factory=utcnow, description="when it was published")
    producer: str = Field(default_factory=producer_version, description="package and version that wrote it")


class ShardInfo(_Model):
    """One gzip JSON Lines shard of a data version."""

    name: str = Field(description="file name, e.g. part-00000.jsonl.gz")
    records: int = Field(ge=0, description="records in the shard")
    sha256: str = Field(description="sha256 of the compressed shard")
    bytes: int = Field(ge=0, description="compressed size")


class DataManifest(_Model):
    """``dataset.json`` of a data version: its completion marker, written last."""

    version: str = Field(description="data version")
    tenant: str = Field(description="owning tenant")
    parent: str | None = Field(None, description="data version it was derived from")
    request_ids: list[str] = Field(default_factory=list, description="erasure requests applied to produce it")
    records: int = Field(ge=0, description="total number of records")
    shards: list[ShardInfo] = Field(default_factory=list, description="shards in order")
    created_at: datetime = Field(default_factory=utcnow, description="when it was committed")
    producer: str = Field(default_factory=producer_version, description="package and version that wrote it")


class ModelManifest(_Model):
    """``eraser-model.json`` of a base model upload: its completion marker, written last."""

    name: str = Field(description="model name under models/")
    files: dict[str, str] = Field(description="relative file name -> sha256")
    created_at: datetime = Field(default_factory=utcnow, description="when it was uploaded")
    producer: str = Field(default_factory=producer_version, description="package and version that wrote it")
