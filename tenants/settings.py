"""Where the store lives, read from ``ERASER_S3_*`` environment variables (pydantic-settings).

Credentials: leave ``access_key``/``secret_key`` unset to use boto3's usual chain
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, instance roles, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tenants.paths import normalize_prefix

DEFAULT_CACHE_DIR = Path("~/.cache/eraser").expanduser()


class StoreSettings(BaseSettings):
    """S3 location, credentials, local cache and retention of the tenant store."""

    model_config = SettingsConfigDict(env_prefix="ERASER_S3_", extra="forbid", frozen=True)

    endpoint: str | None = Field(
        None,
        description="S3 endpoint URL (e.g. http://127.0.0.1:8333); None = AWS S3, or an embedded "
        "SeaweedFS when opened through open_store()",
    )
    use_aws: bool = Field(
        False, description="with no endpoint: True = AWS S3; False = open_store() starts an embedded SeaweedFS"
    )
    bucket: str = Field("eraser", min_length=3, max_length=63, description="bucket holding everything")
    prefix: str = Field("", description="key prefix inside the bucket ('' = bucket root)")
    region: str | None = Field(None, description="S3 region; None = boto3's default (us-east-1 for custom endpoints)")
    access_key: str | None = Field(None, description="access key id; None = boto3 credential chain")
    secret_key: SecretStr | None = Field(None, description="secret access key; None = boto3 credential chain")
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto", description="bucket addressing; 'auto' = path-style for custom endpoints, virtual on AWS"
    )
    cache_dir: Path = Field(DEFAULT_CACHE_DIR, description="local cache of downloaded adapters and models")
    purge_grace_seconds: float = Field(
        60.0, ge=0, description="superseded versions holding erased records are kept this long for rollback"
    )
    receipt_redact_after_seconds: float | None = Field(
        30 * 86400.0, ge=0, description="a published or rejected receipt keeps subject names, record ids and "
        "replacement text this long, then purge replaces them by digests; None = keep them"
    )
    shard_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="a dataset shard is closed once it holds this many uncompressed bytes"
    )
    multipart_bytes: int = Field(
        64 * 1024 * 1024, ge=5 * 1024 * 1024, description="files at least this large are uploaded in parts of this size"
    )
    max_attempts: int = Field(5, ge=1, description="botocore retry attempts per request (standard mode)")
    connect_timeout: float = Field(10.0, gt=0, description="seconds to connect to the S3 endpoint")
    read_timeout: float = Field(120.0, gt=0, description="seconds to wait for an S3 response")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return normalize_prefix(value)

    @field_validator("cache_dir")
    @classmethod
    def _cache_dir(cls, value: Path) -> Path:
        return Path(value).expanduser()

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            return None
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"endpoint {value!r} must start with http:// or https://")
        return value.rstrip("/") if value else value

    def describe(self) -> str:
        """One line for logs (no secrets)."""
        where = self.endpoint or "AWS S3"
        return f"s3://{self.bucket}/{self.prefix} at {where}"
