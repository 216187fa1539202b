"""Thin helpers over a boto3 S3 client: conditional puts, JSON objects, listing, hashed transfers.

Every S3 call of the package goes through :class:`S3IO`, so errors are translated in one place:
a missing key is ``None``/``NotFound``, a lost condition is ``PreconditionLost``, an unreachable
endpoint, a missing bucket or refused credentials is a ``StoreError`` that says what to fix.

File uploads use boto3's managed transfer (parts, concurrency, abort on failure). The writes that must
be conditional stay single ``put_object`` calls (:meth:`S3IO.put_bytes`: claims, commit markers, HEAD,
receipts, with ``IfNoneMatch``/``IfMatch``, issue 15): s3transfer's ``ALLOWED_UPLOAD_ARGS`` (0.19) accept
neither. Downloads stay hand-written because they hash the bytes as they stream them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, TypeVar

from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel
from s3transfer.manager import TransferManager

from tenants.errors import ChecksumMismatchError, StoreError
from tenants.settings import StoreSettings

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

CHUNK = 1024 * 1024
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict"}
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"}


class PreconditionLost(Exception):
    """A conditional write (IfMatch / IfNoneMatch) was refused: the object changed or exists."""


def make_client(settings: StoreSettings) -> Any:
    """A boto3 S3 client for ``settings`` (path-style addressing on custom endpoints)."""
    import boto3
    from botocore.config import Config

    style = settings.addressing_style
    if style == "auto":
        style = "path" if settings.endpoint else "auto"
    config = Config(
        s3={"addressing_style": style},
        signature_version="s3v4",
        retries={"max_attempts": settings.max_attempts, "mode": "standard"},
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        # Checksums only where S3 requires them: the store verifies its own sha256s, and not every
        # S3-compatible server accepts the trailing CRC headers newer botocore sends by default.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    region = settings.region or ("us-east-1" if settings.endpoint else None)
    try:
        return _client(boto3, settings, region, config)
    except BotoCoreError as error:
        raise StoreError(f"cannot configure an S3 client for {settings.describe()}: {error}") from error


_SESSION: Any = None
_SESSION_LOCK = threading.Lock()


def _client(boto3: Any, settings: StoreSettings, region: str | None, config: Any) -> Any:
    # One boto3 session per process: it caches the parsed S3 service model, which makes every
    # further client ~50x cheaper to create. Sessions are not thread-safe, clients are: create
    # clients under a lock, use them freely.
    global _SESSION
    with _SESSION_LOCK:
        if _SESSION is None:
            _SESSION = boto3.session.Session()
        return _SESSION.client(
            "s3",
            endpoint_url=settings.endpoint,
            region_name=region,
            aws_access_key_id=settings.access_key,
            aws_secret_access_key=settings.secret_key.get_secret_value() if settings.secret_key else None,
            config=config,
        )


def error_code(error: ClientError) -> tuple[str, int]:
    code = str(error.response.get("Error", {}).get("Code", ""))
    status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    last_modified: datetime


class S3IO:
    """The S3 operations the store needs, on one bucket, with errors translated."""

    def __init__(self, client: Any, settings: StoreSettings) -> None:
        self.client = client
        self.settings = settings
        self.bucket = settings.bucket

    # ------------------------------------------------------------ error translation
    def call(self, operation: str, **kwargs: Any) -> Any:
        """``client.<operation>(**kwargs)``; ClientErrors other than bucket/credential ones propagate."""
        with self._translated(operation):
            return getattr(self.client, operation)(**kwargs)

    @contextmanager
    def _translated(self, operation: str) -> Iterator[None]:
        """Bucket, credential and connection errors of ``operation`` as StoreErrors that say what to fix."""
        where = self.settings.endpoint or "AWS S3"
        try:
            yield
        except ClientError as error:
            code, status = error_code(error)
            if code == "NoSuchBucket" and operation != "head_bucket":
                raise StoreError(
                    f"bucket {self.bucket!r} does not exist at {where} (create it with TenantStore.ensure_bucket())"
                ) from error
            if code in _CREDENTIAL_CODES and operation not in ("head_object", "head_bucket"):
                raise StoreError(f"S3 at {where} refused {operation} on bucket {self.bucket!r}: {code}") from error
            raise
        except BotoCoreError as error:
            raise StoreError(f"cannot reach S3 at {where} ({operation}): {error}") from error

    @staticmethod
    def is_missing(error: ClientError) -> bool:
        code, status = error_code(error)
        return code in _MISSING_CODES or (status == 404 and code != "NoSuchBucket")

    @staticmethod
    def is_precondition(error: ClientError) -> bool:
        code, status = error_code(error)
        return code in _PRECONDITION_CODES or status == 412

    # ------------------------------------------------------------ small objects
    def put_bytes(
        self,
        key: str,
        body: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
        content_type: str = "application/octet-stream",
    ) -> str:
        """Write ``body`` at ``key``; returns the new ETag. PreconditionLost if a condition fails.

        Idempotent under retries: botocore resends a PUT whose response was lost, and the resent
        conditional PUT gets 412 because the first one succeeded. So after a 412 the object is read
        back, and if it already holds exactly ``body`` the write counts as done (its ETag is returned).
        """
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Body": body, "ContentType": content_type}
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        try:
            response = self.call("put_object", **kwargs)
        except ClientError as error:
            if self.is_precondition(error):
                found = self.get_bytes(key)
                if found is not None and found[0] == body:
                    logger.info("s3://%s/%s: a conditional write got 412 but the object holds exactly what was "
                                "written (a retried request whose first attempt succeeded): done", self.bucket, key)
                    return found[1]
                raise PreconditionLost(key) from error
            raise
        return str(response.get("ETag", ""))

    def get_bytes(self, key: str) -> tuple[bytes, str] | None:
        """(body, ETag) of ``key``, or None if it does not exist."""
        try:
            response = self.call("get_object", Bucket=self.bucket, Key=key)
        except ClientError as error:
            if self.is_missing(error):
                return None
            raise
        return response["Body"].read(), str(response.get("ETag", ""))

    def put_model(self, key: str, model: BaseModel, **conditions: Any) -> str:
        body = model.model_dump_json(indent=2).encode() + b"\n"
        return self.put_bytes(key, body, content_type="application/json", **conditions)

    def get_model(self, key: str, cls: type[M]) -> tuple[M, str] | None:
        """(parsed model, ETag) of a JSON object, or None if missing. StoreError if unparseable."""
        found = self.get_bytes(key)
        if found is None:
            return None
        body, etag = found
        try:
            return cls.model_validate_json(body), etag
        except ValueError as error:
            raise StoreError(f"s3://{self.bucket}/{key} is not a valid {cls.__name__}: {error}") from error

    def exists(self, key: str) -> bool:
        try:
            self.call("head_object", Bucket=self.bucket, Key=key)
        except ClientError as error:
            if self.is_missing(error):
                return False
            code, _ = error_code(error)
            raise StoreError(f"cannot check s3://{self.bucket}/{key}: {code}") from error
        return True

    # ------------------------------------------------------------ listing and deleting
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object under ``prefix`` (paged)."""
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = self.call("list_objects_v2", **kwargs)
            for item in page.get("Contents", []):
                yield ObjectInfo(item["Key"], int(item.get("Size", 0)), str(item.get("ETag", "")), item["LastModified"])
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def list_dirs(self, prefix: str) -> list[str]:
        """Names of the 'directories' directly under ``prefix`` (delimiter listing)."""
        names: list[str] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "Delimiter": "/"}
            if token:
                kwargs["ContinuationToken"] = token
            page = self.call("list_objects_v2", **kwargs)
            for item in page.get("CommonPrefixes", []):
                name = item["Prefix"][len(prefix):].strip("/")
                if name:
                    names.append(name)
            if not page.get("IsTruncated"):
                return names
            token = page.get("NextContinuationToken")

    def delete_keys(self, keys: list[str]) -> int:
        """Delete ``keys`` (batches of 1000); returns how many were deleted. StoreError on failure."""
        deleted = 0
        for start in range(0, len(keys), 1000):
            batch = keys[start:start + 1000]
            response = self.call(
                "delete_objects", Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
            )
            errors = response.get("Errors", [])
            if errors:
                raise StoreError(f"could not delete {len(errors)} objects, e.g. {errors[0].get('Key')}: {errors[0].get('Code')}")
            deleted += len(batch)
        return deleted

    def delete_prefix(self, prefix: str, first: str | None = None, keep: set[str] | None = None) -> int:
        """Delete everything under ``prefix`` but ``keep``; ``first`` (the commit marker) goes first."""
        keys = [info.key for info in self.list(prefix) if info.key not in (keep or set())]
        count = 0
        if first is not None and first in keys:
            count += self.delete_keys([first])
            keys.remove(first)
        return count + self.delete_keys(keys)

    # ------------------------------------------------------------ files with sha256
    def upload_file(self, key: str, path: Path) -> str:
        """Upload a local file with boto3's managed transfer (in parts of ``multipart_bytes`` past that
        size, a failed multipart upload aborted); returns its sha256 (hex)."""
        digest = sha256_file(path)
        part = self.settings.multipart_bytes
        config = TransferConfig(multipart_threshold=part, multipart_chunksize=part)
        # the manager calls self.client's put_object/upload_part itself (a wrapping test client sees them)
        with self._translated("upload_file"):
            with TransferManager(self.client, config) as manager:
                manager.upload(str(path), self.bucket, key).result()
        return digest

    def download_file(self, key: str, destination: Path, expected_sha256: str | None) -> str:
        """Stream ``key`` to ``destination`` hashing as it goes; ChecksumMismatchError if it differs."""
        response = self._get_stream(key)
        hasher = hashlib.sha256()
        destination.parent.mkdir(parents=True, exist_ok=True)
        with open(destination, "wb") as handle:
            for chunk in response["Body"].iter_chunks(CHUNK):
                hasher.update(chunk)
                handle.write(chunk)
        digest = hasher.hexdigest()
        if expected_sha256 is not None and digest != expected_sha256:
            destination.unlink(missing_ok=True)
            raise ChecksumMismatchError(
                f"s3://{self.bucket}/{key}: sha256 {digest} differs from the recorded {expected_sha256}"
            )
        return digest

    def download_verified(self, key: str, expected_sha256: str) -> IO[bytes]:
        """A rewound temporary file with the object's bytes, verified against ``expected_sha256``."""
        response = self._get_stream(key)
        hasher = hashlib.sha256()
        spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=16 * CHUNK)  # noqa: SIM115 (returned)
        for chunk in response["Body"].iter_chunks(CHUNK):
            hasher.update(chunk)
            spool.write(chunk)
        if hasher.hexdigest() != expected_sha256:
            spool.close()
            raise ChecksumMismatchError(
                f"s3://{self.bucket}/{key}: sha256 {hasher.hexdigest()} differs from the recorded {expected_sha256}"
            )
        spool.seek(0)
        return spool

    def _get_stream(self, key: str) -> Any:
        try:
            return self.call("get_object", Bucket=self.bucket, Key=key)
        except ClientError as error:
            if self.is_missing(error):
                raise ChecksumMismatchError(f"s3://{self.bucket}/{key} is recorded but missing") from error
            raise


def sha256_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def local_files(directory: Path, skip: set[str]) -> list[str]:
    """Relative '/'-separated names of the regular files under ``directory`` (sorted)."""
    names = []
    for root, _dirs, files in os.walk(directory):
        for file_name in files:
            path = Path(root) / file_name
            relative = path.relative_to(directory).as_posix()
            if relative in skip or not path.is_file():
                continue
            names.append(relative)
    return sorted(names)
