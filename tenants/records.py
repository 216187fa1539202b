"""Records as JSON Lines: parsing with line numbers, duplicate detection, gzip shards."""

from __future__ import annotations

import gzip
import io
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from tenants.errors import InvalidRecordsError
from tenants.models import Record, content_id

logger = logging.getLogger(__name__)


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ())) or "record"
    return f"{where}: {first.get('msg')}"


def _validated(data: Any, where: str) -> Record:
    """``data`` as a Record, or InvalidRecordsError naming ``where`` and the first bad field."""
    try:
        return Record.model_validate(data)
    except ValidationError as error:
        raise InvalidRecordsError(f"{where}: invalid record: {_describe(error)}") from error


def _first_time(record: Record, seen: dict[str, int], position: int, where: str, first_at: str) -> None:
    """Refuse a record id already ``seen`` (InvalidRecordsError naming both places), else note it at ``position``."""
    if record.id in seen:
        raise InvalidRecordsError(f"{where}: duplicate record id {record.id!r} ({first_at} {seen[record.id]})")
    seen[record.id] = position


def with_derived_id(data: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """A chat record given without ``id`` gets one derived from its messages (stable across uploads)."""
    if data.get("id") is not None or not isinstance(data.get("messages"), list):
        return data, False
    messages = data["messages"]
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
               for m in messages):
        return data, False  # validation names the malformed message
    return {**data, "id": content_id(messages)}, True


def parse_jsonl(lines: Iterable[str | bytes], source: str = "<records>") -> Iterator[Record]:
    """Records of either form from JSON Lines; blank lines are skipped; duplicate ids are refused
    (two chat records without ids and with the same messages are one record given twice).

    Errors are InvalidRecordsError naming ``source``, the 1-based line number and the field.
    """
    seen: dict[str, int] = {}
    derived = 0
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
        except (ValueError, RecursionError) as error:  # an integer of > 4300 digits, nesting past the stack
            reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)
            raise InvalidRecordsError(f"{source}:{number}: invalid JSON: {reason}") from None
        if not isinstance(data, dict):
            raise InvalidRecordsError(f"{source}:{number}: expected a JSON object, got {type(data).__name__}")
        data, was_derived = with_derived_id(data)
        derived += was_derived
        record = _validated(data, f"{source}:{number}")
        _first_time(record, seen, number, f"{source}:{number}", "first on line")
        yield record
    if derived:
        logger.info("%s: %d record(s) had no id; ids derived from their messages (sha256)", source, derived)


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
            record = _validated(with_derived_id(item)[0] if isinstance(item, dict) else item, f"record {position}")
        _first_time(record, seen, position, f"record {position}", "first at record")
        yield record


# ---------------------------------------------------------------- reference records (imports)


def content_key(record: Record) -> tuple[tuple[str, str], ...]:
    """What a record says, whatever its id and form: its turns as (role, content) pairs, a prompt/response
    record being one user turn and one assistant turn. Two records with one key are one example."""
    if record.messages is None:
        return (("user", record.prompt or ""), ("assistant", record.response or ""))
    return tuple((m.role, m.content) for m in record.messages)


def check_reference(train: list[Record], reference: list[Record]) -> None:
    """Refuse a reference the membership test cannot stand on: none at all, or records the adapter trained
    on (the same id, or the same turns under another id), against which an erased record would be judged
    like never-seen data while it is not. Training records flagged 'heldout' are refused too: the flag
    is what makes a record reference."""
    if not train:
        raise InvalidRecordsError("records: no training records (the records the adapter was trained on)")
    if not reference:
        raise InvalidRecordsError(
            "reference: no records; the membership test needs records of the same kind the adapter never trained on")
    flagged = [r.id for r in train if r.heldout]
    if flagged:
        raise InvalidRecordsError(f"records: {len(flagged)} record(s) flagged 'heldout' ({flagged[:5]}); records "
                                  "the adapter never trained on belong in the reference")
    train_ids = {r.id for r in train}
    same_id = [r.id for r in reference if r.id in train_ids]
    if same_id:
        raise InvalidRecordsError(f"reference: {len(same_id)} record id(s) are also training records: {same_id[:5]}")
    by_content = {content_key(r): r.id for r in train}
    same_content = [(r.id, by_content[content_key(r)]) for r in reference if content_key(r) in by_content]
    if same_content:
        pairs = ", ".join(f"{ref!r} = training {trained!r}" for ref, trained in same_content[:5])
        raise InvalidRecordsError(f"reference: {len(same_content)} record(s) repeat a training record's turns: {pairs}")


def imported_dataset(train: Iterable[Record | dict[str, Any]], reference: Iterable[Record | dict[str, Any]]) -> list[Record]:
    """The first data version of an imported tenant: the training records, then the reference records
    flagged ``heldout`` (one dataset, so erasures, purge and retention cover the reference too)."""
    train, reference = list(coerce_records(train)), list(coerce_records(reference))
    check_reference(train, reference)
    return train + [r if r.heldout else r.model_copy(update={"heldout": True}) for r in reference]


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
