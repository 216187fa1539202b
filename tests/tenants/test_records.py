"""JSON Lines parsing, duplicate detection and gzip shards (no S3 needed)."""

from __future__ import annotations

import gzip
import io

import pytest

from tenants.errors import InvalidRecordsError
from tenants.models import Record
from tenants.records import ShardWriter, coerce_records, iter_shard, parse_jsonl, read_jsonl

GOOD = '{"id": "a", "subject": "s", "prompt": "p", "response": "r"}'


def test_parse_skips_blank_lines_and_keeps_order():
    lines = [GOOD, "", '{"id": "b", "prompt": "p2", "response": "r2"}', "   "]
    parsed = list(parse_jsonl(lines))
    assert [r.id for r in parsed] == ["a", "b"]
    assert parsed[1].subject is None


@pytest.mark.parametrize(
    ("bad_line", "fragment"),
    [
        ('{"id": "b", "prompt": "p"', "invalid JSON"),
        ('["not", "an", "object"]', "expected a JSON object"),
        ('{"id": "b", "prompt": "p"}', "response"),
        ('{"id": "", "prompt": "p", "response": "r"}', "id"),
        ('{"id": "b", "prompt": "p", "response": "r", "extra": 1}', "extra"),
        ('{"id": 5, "prompt": "p", "response": "r"}', "id"),
    ],
)
def test_malformed_line_is_named(bad_line, fragment):
    with pytest.raises(InvalidRecordsError) as caught:
        list(parse_jsonl([GOOD, "", bad_line], source="upload.jsonl"))
    assert "upload.jsonl:3:" in str(caught.value)
    assert fragment in str(caught.value)


def test_duplicate_ids_name_both_lines(tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_text(GOOD + "\n" + GOOD.replace('"p"', '"q"') + "\n")
    with pytest.raises(InvalidRecordsError, match=r"dup.jsonl:2: duplicate record id 'a' \(first on line 1\)"):
        list(read_jsonl(path))


def test_read_jsonl_gz(tmp_path):
    path = tmp_path / "r.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.write(GOOD + "\n")
    assert [r.id for r in read_jsonl(path)] == ["a"]


def test_coerce_refuses_duplicates_and_bad_dicts():
    with pytest.raises(InvalidRecordsError, match="record 2: duplicate record id 'a'"):
        list(coerce_records([Record(id="a", prompt="p", response="r"), {"id": "a", "prompt": "p", "response": "r"}]))
    with pytest.raises(InvalidRecordsError, match="record 1: invalid record"):
        list(coerce_records([{"id": "a"}]))


def test_shards_round_trip_and_split_by_size():
    writer = ShardWriter(shard_bytes=1024)
    shards = []
    records = [Record(id=str(i), prompt="p" * 100, response="r" * 100) for i in range(30)]
    for record in records:
        if (done := writer.add(record)) is not None:
            shards.append(done)
    if (done := writer.finish()) is not None:
        shards.append(done)
    assert len(shards) > 3
    assert sum(count for _, count in shards) == 30
    back = [r for body, _ in shards for r in iter_shard(io.BytesIO(body), "s")]
    assert back == records
    # deterministic bytes (gzip mtime fixed): same records, same shard
    again = ShardWriter(shard_bytes=10**9)
    again.add(records[0])
    other = ShardWriter(shard_bytes=10**9)
    other.add(records[0])
    assert again.finish() == other.finish()
