"""Records as JSON Lines: parsing with line numbers, duplicate detection, gzip shards."""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from tenants.errors import InvalidRecordsError
from tenants.models import Record


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ())) or "record"
    return f"{where}: {first.get('msg')}"


def parse_jsonl(lines: Iterable[str | bytes], source: str = "<records>") -> Iterator[Record]:
    """Records from JSON Lines; blank lines are skipped; duplicate ids are refused.

    Errors are InvalidRecordsError naming ``source`` and the 1-based line number.
    """
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise InvalidRecordsError(f"{source}:{number}: not UTF-8 ({error.reason})") from error
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as error:
            raise InvalidRecordsError(f"{source}:{number}: invalid JSON: {error.msg} (column {error.colno})") from error
        if not isinstance(data, dict):
            raise InvalidRecordsError(f"{source}:{number}: expected a JSON object, got {type(data).__name__}")
        try:
            record = Record.model_validate(data)
        except ValidationError as error:
            raise InvalidRecordsError(f"{source}:{number}: invalid record: {_describe(error)}") from error
        if record.id in seen:
            raise InvalidRecordsError(
                f"{source}:{number}: duplicate record id {record.id!r} (first on line {seen[record.id]})"
            )
        seen[record.id] = number
        yield record


def read_jsonl(path: str | Path) -> Iterator[Record]:
    """Records of a local ``.jsonl`` or ``.jsonl.gz`` file (streaming)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:  # type: ignore[operator]
        yield from parse_jsonl(handle, source=str(path))


def coerce_records(records: Iterable[Record | dict[str, Any]]) -> Iterator[Record]:
    """Records from models or dicts, refusing invalid ones and duplicate ids (1-based position)."""
    seen: dict[str, int] = {}
    for position, item in enumerate(records, start=1):
        if isinstance(item, Record):
            record = item
        else:
            try:
                record = Record.model_validate(item)
            except ValidationError as error:
                raise InvalidRecordsError(f"record {position}: invalid record: {_describe(error)}") from error
        if record.id in seen:
            raise InvalidRecordsError(
                f"record {position}: duplicate record id {record.id!r} (first at record {seen[record.id]})"
            )
        seen[record.id] = position
        yield record


def encode_record(record: Record) -> bytes:
    return record.model_dump_json(exclude_none=True).encode() + b"\n"


class ShardWriter:
    """Accumulates records into gzip JSON Lines shards of about ``shard_bytes`` uncompressed."""

    def __init__(self, shard_bytes: int) -> None:
        self.shard_bytes = shard_bytes
        self._buffer = io.BytesIO()
        self._gzip: gzip.GzipFile | None = None
        self._raw = 0
        self.records = 0

    def add(self, record: Record) -> tuple[bytes, int] | None:
        """Add one record; returns a finished shard (compressed bytes, records) once it is full."""
        if self._gzip is None:
            self._buffer = io.BytesIO()
            # mtime=0: the same records always give the same bytes (and the same sha256).
            self._gzip = gzip.GzipFile(fileobj=self._buffer, mode="wb", compresslevel=6, mtime=0)
            self._raw = 0
            self.records = 0
        line = encode_record(record)
        self._gzip.write(line)
        self._raw += len(line)
        self.records += 1
        if self._raw >= self.shard_bytes:
            return self.finish()
        return None

    def finish(self) -> tuple[bytes, int] | None:
        """Close the current shard: (compressed bytes, records), or None if it is empty."""
        if self._gzip is None:
            return None
        self._gzip.close()
        self._gzip = None
        return self._buffer.getvalue(), self.records


def iter_shard(handle: IO[bytes], source: str) -> Iterator[Record]:
    """Records of one stored gzip shard (written by this package, so ids are already unique)."""
    with gzip.GzipFile(fileobj=handle, mode="rb") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                yield Record.model_validate_json(line)
            except ValidationError as error:
                raise InvalidRecordsError(f"{source}:{number}: invalid stored record: {_describe(error)}") from error
