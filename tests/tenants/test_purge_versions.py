"""Purge on a versioned bucket (SeaweedFS keeps versions like S3): nothing erased survives as a
noncurrent version or behind a delete marker, and current objects are untouched."""

from __future__ import annotations

import uuid

import pytest

from tenants.models import ErasureRequest
from tenants.store import TenantStore
from tests.tenants.helpers import erase_r1, onboard


@pytest.fixture(scope="module")
def versioned_bucket(s3_server):
    settings = s3_server.settings(bucket="eraser-versioned")
    store = TenantStore(settings)
    store.ensure_bucket()
    store.io.call("put_bucket_versioning", Bucket=settings.bucket, VersioningConfiguration={"Status": "Enabled"})
    return settings.bucket


@pytest.fixture
def vstore(s3_server, versioned_bucket, tmp_path):
    return TenantStore(s3_server.settings(bucket=versioned_bucket, prefix=f"t-{uuid.uuid4().hex[:12]}",
                                          cache_dir=tmp_path / "cache"))


def all_versions(store, prefix: str) -> list[tuple[str, str]]:
    page = store.io.call("list_object_versions", Bucket=store.settings.bucket, Prefix=prefix)
    return [(v["Key"], v["VersionId"]) for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]


def bytes_of_every_version(store, prefix: str) -> list[bytes]:
    page = store.io.call("list_object_versions", Bucket=store.settings.bucket, Prefix=prefix)
    return [store.io.call("get_object", Bucket=store.settings.bucket, Key=v["Key"], VersionId=v["VersionId"])["Body"]
            .read() for v in page.get("Versions", [])]


def test_purge_deletes_noncurrent_versions_of_erased_data(vstore, tmp_path):
    import gzip

    store = vstore
    assert store.bucket_versioned()
    d1, v1, d2, v2 = erase_r1(store, tmp_path)
    old_data = store.layout.data_dir("acme", d1)
    assert any(b"code-1" in gzip.decompress(body) for body in bytes_of_every_version(store, old_data)
               if body[:2] == b"\x1f\x8b")

    entries = store.purge("acme", v2, d2, older_than=0)
    assert {(e["kind"], e["version"]) for e in entries} == {("adapter", v1), ("data", d1)}
    # no version, noncurrent or behind a delete marker, of the purged prefixes is left but the claims
    for prefix in (old_data, store.layout.adapter_dir("acme", v1)):
        left = all_versions(store, prefix)
        assert [key.rsplit("/", 1)[1] for key, _ in left] == ["_claim.json"], left
    tenant = store.layout.tenant_dir("acme")
    shards = [body for body in bytes_of_every_version(store, tenant) if body[:2] == b"\x1f\x8b"]
    assert shards and not any(b"code-1" in gzip.decompress(body) for body in shards)
    # what is current stays readable: HEAD, its data and adapter, the receipt
    assert [r.id for r in store.iter_dataset("acme", d2)] == ["r0", "r2", "r3", "r4", "r5"]
    assert store.get_head("acme")[0].adapter == v2
    assert store.get_adapter_manifest("acme", v2).version == v2
    assert store.get_receipt("acme", "req-1").status.value == "published"


def test_purge_on_an_unversioned_bucket_reads_the_setting_once(store, tmp_path):
    calls = []
    real = store.io.call

    def counting(operation, **kwargs):
        calls.append(operation)
        return real(operation, **kwargs)

    store.io.call = counting
    onboard(store, tmp_path)
    head, _ = store.get_head("acme")
    assert store.purge("acme", head.adapter, head.data) == [] and store.purge("acme", head.adapter, head.data) == []
    assert calls.count("get_bucket_versioning") == 1 and "list_object_versions" not in calls


def test_a_redacted_receipt_leaves_no_version_in_clear(vstore, tmp_path):
    from datetime import timedelta

    from tenants.models import utcnow

    store = vstore
    d1, v1, _ = onboard(store, tmp_path)
    receipt, _ = store.submit_erasure(ErasureRequest(request_id="dsr-1", tenant="acme", kind="remove",
                                                     subjects=["user1"]))
    receipt.transition("running")
    store.save_receipt(receipt)
    receipt.transition("published", records_affected=["r1", "r4"])
    store.save_receipt(receipt)
    key = store.layout.receipt("acme", "dsr-1")
    assert len(all_versions(store, key)) == 3  # pending, running, published
    store.purge("acme", v1, d1, now=utcnow() + timedelta(days=31))
    assert len(all_versions(store, key)) == 1
    (body,) = bytes_of_every_version(store, key)
    assert b"user1" not in body and b'"r1"' not in body and b"redacted_at" in body


def test_completeness_fails_while_a_deleted_version_survives_as_a_hidden_copy(vstore, tmp_path):
    store = vstore
    d1, v1, d2, v2 = erase_r1(store, tmp_path)
    head, _ = store.get_head("acme")
    receipt = store.get_receipt("acme", "req-1")
    # deleted as purge does, but the noncurrent versions it sweeps afterwards are left
    for prefix, marker in ((store.layout.adapter_dir("acme", v1), store.layout.adapter_manifest("acme", v1)),
                           (store.layout.data_dir("acme", d1), store.layout.data_manifest("acme", d1))):
        store.io.delete_prefix(prefix, first=marker, keep={prefix + "_claim.json"})

    _, versions = store.check_completion("acme", head, [receipt])["req-1"]
    assert not versions.ok and "hidden object version(s) left" in versions.detail

    store.purge("acme", v2, d2, older_than=0)
    _, versions = store.check_completion("acme", head, [receipt])["req-1"]
    assert versions.ok and versions.detail.endswith("no hidden copy")
