"""Fault injection: failed uploads, racing writers, corrupted objects (real SeaweedFS underneath)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from botocore.exceptions import EndpointConnectionError

from tenants.errors import ChecksumMismatchError, HeadConflictError, StoreError, VersionNotFoundError
from tenants.models import AdapterManifest, ErasureRequest, Head, TenantConfig, utcnow
from tenants.store import TenantStore

from tests.tenants.helpers import adapter_dir, onboard, records

pytestmark = pytest.mark.slow


class FaultyClient:
    """Wraps a boto3 client; ``fail(operation, kwargs)`` decides which calls raise instead."""

    def __init__(self, real: Any, fail: Callable[[str, dict[str, Any]], bool]) -> None:
        self._real = real
        self._fail = fail
        self.failures = 0

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._real, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            if self._fail(name, kwargs):
                self.failures += 1
                raise EndpointConnectionError(endpoint_url="http://injected-fault")
            return attribute(*args, **kwargs)

        return call


def faulty_store(store: TenantStore, fail: Callable[[str, dict[str, Any]], bool]) -> TenantStore:
    return TenantStore(store.settings, client=FaultyClient(store.client, fail))


def test_failure_mid_adapter_upload_leaves_no_version_and_head_unchanged(store, tmp_path):
    data, v1, etag = onboard(store, tmp_path)
    head_before = store.get_head("acme")
    broken = faulty_store(
        store, lambda op, kw: op == "put_object" and kw.get("Key", "").endswith("adapter_model.safetensors")
    )
    with pytest.raises(StoreError, match="injected-fault"):
        broken.publish_adapter("acme", adapter_dir(tmp_path, b"new", "new"), AdapterManifest(data_version=data))
    assert broken.client.failures == 1
    assert store.list_adapter_versions("acme") == [v1]
    assert store.get_head("acme") == head_before and head_before[1] == etag
    # nothing of the failed version is left behind, and the next publish is fine
    keys = [info.key for info in store.io.list(store.layout.adapters_root("acme"))]
    assert all("/v000001/" in key or key.endswith("v000002/_claim.json") for key in keys)
    v3 = store.publish_adapter("acme", adapter_dir(tmp_path, b"new", "new2"), AdapterManifest(data_version=data))
    assert store.list_adapter_versions("acme") == [v1, v3] and v3 == "v000003"  # numbers never reused


def test_failure_mid_multipart_upload_aborts_it(store, tmp_path):
    """boto3's managed transfer: a part that fails aborts the multipart upload and surfaces as StoreError."""
    small_parts = TenantStore(store.settings.model_copy(update={"multipart_bytes": 5 * 1024 * 1024}),
                              client=store.client)
    data, v1, _ = onboard(small_parts, tmp_path)
    broken = faulty_store(small_parts, lambda op, kw: op == "upload_part" and kw.get("PartNumber") == 2)
    weights = bytes(range(256)) * (11 * 1024 * 1024 // 256)  # ~11 MiB: three parts
    with pytest.raises(StoreError, match="injected-fault"):
        broken.publish_adapter("acme", adapter_dir(tmp_path, weights, "big"), AdapterManifest(data_version=data))
    assert small_parts.list_adapter_versions("acme") == [v1]
    prefix = small_parts.layout.adapters_root("acme")
    pending = store.client.list_multipart_uploads(Bucket=store.settings.bucket, Prefix=prefix).get("Uploads", [])
    assert pending == []


def test_crash_before_commit_is_invisible_and_purged_later(store, tmp_path):
    """A writer that dies before eraser.json (and cannot clean up) leaves an uncommitted prefix."""
    data, v1, etag = onboard(store, tmp_path)
    crashed = faulty_store(
        store,
        lambda op, kw: (op == "put_object" and kw.get("Key", "").endswith("eraser.json")) or op == "delete_objects",
    )
    with pytest.raises(StoreError):
        crashed.publish_adapter("acme", adapter_dir(tmp_path, b"x", "x"), AdapterManifest(data_version=data))
    assert store.list_adapter_versions("acme") == [v1]
    with pytest.raises(VersionNotFoundError):
        store.download_adapter("acme", "v000002")
    with pytest.raises(VersionNotFoundError):
        store.move_head("acme", Head(adapter="v000002", data=data), etag)
    assert store.get_head("acme")[1] == etag
    assert store.next_adapter_version("acme") == "v000003"  # the dead number is not reused
    assert store.purge("acme", v1, data) == []  # too young to be called abandoned
    store.orphan_seconds = 0
    entries = store.purge("acme", v1, data, now=utcnow() + timedelta(seconds=1))
    assert [(e["kind"], e["version"]) for e in entries] == [("adapter-partial", "v000002")]
    left = [i.key for i in store.io.list(store.layout.adapters_root("acme")) if "/v000002/" in i.key]
    assert [key.rsplit("/", 1)[1] for key in left] == ["_claim.json"]


def test_failure_mid_dataset_upload_leaves_no_version(s3_server, s3_bucket, tmp_path):
    import uuid

    store = TenantStore(s3_server.settings(bucket=s3_bucket, prefix=f"t-{uuid.uuid4().hex[:8]}", shard_bytes=1024,
                                           cache_dir=tmp_path / "c"))
    store.create_tenant(TenantConfig(name="acme", base_model="m"))
    broken = faulty_store(store, lambda op, kw: op == "put_object" and "part-00002" in kw.get("Key", ""))
    with pytest.raises(StoreError):
        broken.put_dataset("acme", records(50))
    assert store.list_data_versions("acme") == []
    assert [i.key.rsplit("/", 2)[-2:] for i in store.io.list(store.layout.data_root("acme"))] == [
        ["d000001", "_claim.json"]  # only the claim: the number is never reused
    ]


def test_concurrent_head_moves_exactly_one_wins(store, tmp_path):
    data, v1, etag = onboard(store, tmp_path)
    candidates = [
        store.publish_adapter("acme", adapter_dir(tmp_path, bytes([i]), f"c{i}"), AdapterManifest(data_version=data))
        for i in range(2)
    ]
    for _ in range(3):
        _, etag = store.get_head("acme")
        barrier = threading.Barrier(len(candidates))
        outcomes: list[Any] = [None] * len(candidates)

        def move(index: int) -> None:
            barrier.wait()
            try:
                outcomes[index] = store.move_head("acme", Head(adapter=candidates[index], data=data), etag)
            except HeadConflictError as error:
                outcomes[index] = error

        threads = [threading.Thread(target=move, args=(i,)) for i in range(len(candidates))]
        [t.start() for t in threads]
        [t.join() for t in threads]
        winners = [i for i, o in enumerate(outcomes) if isinstance(o, str)]
        assert len(winners) == 1, outcomes
        assert sum(isinstance(o, HeadConflictError) for o in outcomes) == 1
        assert store.get_head("acme")[0].adapter == candidates[winners[0]]


def test_concurrent_publishes_get_distinct_versions(store, tmp_path):
    data, v1, _ = onboard(store, tmp_path)
    barrier = threading.Barrier(3)
    versions: list[str] = []

    def publish(index: int) -> None:
        local = adapter_dir(tmp_path, bytes([index]) * 10, f"p{index}")
        barrier.wait()
        versions.append(store.publish_adapter("acme", local, AdapterManifest(data_version=data)))

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(versions) == ["v000002", "v000003", "v000004"]
    for version in versions:  # each one intact
        store.download_adapter("acme", version)


def test_concurrent_submits_of_one_request_create_one_receipt(store, tmp_path):
    onboard(store, tmp_path)
    request = ErasureRequest(request_id="same", tenant="acme", kind="remove", records=["r1"])
    barrier = threading.Barrier(4)
    created: list[bool] = []

    def submit() -> None:
        barrier.wait()
        created.append(store.submit_erasure(request, validate=False)[1])

    threads = [threading.Thread(target=submit) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(created) == [False, False, False, True]
    assert len(store.list_receipts("acme")) == 1


def test_corrupted_adapter_fails_its_checksum(store, tmp_path):
    data, v1, _ = onboard(store, tmp_path)
    key = store.layout.adapter_file("acme", v1, "adapter_model.safetensors")
    store.client.put_object(Bucket=store.settings.bucket, Key=key, Body=b"tampered")
    with pytest.raises(ChecksumMismatchError, match="adapter_model.safetensors"):
        store.download_adapter("acme", v1)
    cached = store.adapter_cache_path("acme", v1)
    assert not cached.exists() and not any(cached.parent.glob(".tmp-*"))


def test_missing_adapter_file_fails_its_checksum(store, tmp_path):
    data, v1, _ = onboard(store, tmp_path)
    store.client.delete_object(Bucket=store.settings.bucket, Key=store.layout.adapter_file("acme", v1, "README.md"))
    with pytest.raises(ChecksumMismatchError, match="missing"):
        store.download_adapter("acme", v1)


def test_corrupted_data_shard_fails_its_checksum(store, tmp_path):
    data, v1, _ = onboard(store, tmp_path)
    key = store.layout.data_shard("acme", data, 0)
    body, _ = store.io.get_bytes(key)
    store.client.put_object(Bucket=store.settings.bucket, Key=key, Body=body[:-1] + bytes([body[-1] ^ 1]))
    with pytest.raises(ChecksumMismatchError, match="part-00000"):
        store.read_dataset("acme", data)
