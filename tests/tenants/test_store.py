"""The store against a real S3 server (SeaweedFS, started once per session by tests/conftest.py)."""

from __future__ import annotations

import json
import uuid

import pytest

from tenants.errors import (
    ConflictError,
    HeadConflictError,
    InvalidAdapterError,
    InvalidRecordsError,
    InvalidTenantNameError,
    ReceiptNotFoundError,
    TenantExistsError,
    TenantNotFoundError,
    UnknownRecordError,
    VersionNotFoundError,
)
from tenants.models import AdapterManifest, ErasureRequest, Head, ReceiptStatus, TenantConfig
from tenants.records import parse_jsonl
from tenants.store import TenantStore

from tests.tenants.helpers import adapter_dir, onboard, records

pytestmark = pytest.mark.slow


def test_tenants_create_get_list(store):
    assert store.list_tenants() == []
    store.create_tenant(TenantConfig(name="beta", base_model="tiny-llama", lora={"rank": 4}))
    store.create_tenant(TenantConfig(name="acme", base_model="s3://eraser/models/tiny"))
    assert store.list_tenants() == ["acme", "beta"]
    assert store.get_tenant("beta").lora.rank == 4
    with pytest.raises(TenantExistsError):
        store.create_tenant(TenantConfig(name="acme", base_model="other"))
    with pytest.raises(TenantNotFoundError):
        store.get_tenant("nobody")


@pytest.mark.parametrize("name", ["../x", "a/b", ""])
def test_escaping_tenant_names_never_reach_s3(store, name):
    with pytest.raises(InvalidTenantNameError):
        store.get_tenant(name)
    with pytest.raises(InvalidTenantNameError):
        store.put_dataset(name, records(1))
    with pytest.raises(InvalidTenantNameError):
        store.get_head(name)


def test_dataset_versions_stream_and_shard(s3_server, s3_bucket, tmp_path):
    settings = s3_server.settings(bucket=s3_bucket, prefix=f"t-{uuid.uuid4().hex[:8]}", shard_bytes=2048,
                                  cache_dir=tmp_path / "cache")
    store = TenantStore(settings)
    store.create_tenant(TenantConfig(name="acme", base_model="m"))
    data = records(60)
    first = store.put_dataset("acme", data)
    manifest = store.get_data_manifest("acme", first)
    assert first == "d000001" and manifest.records == 60 and len(manifest.shards) > 2
    assert store.read_dataset("acme", first) == data
    stream = store.iter_dataset("acme", first)
    assert next(stream) == data[0]  # lazy: one shard at a time
    stream.close()
    second = store.put_dataset("acme", data[:10], parent=first, request_ids=["req-1"])
    assert second == "d000002"
    assert store.list_data_versions("acme") == ["d000001", "d000002"]
    assert store.get_data_manifest("acme", second).parent == first
    empty = store.put_dataset("acme", [])
    assert store.read_dataset("acme", empty) == []
    with pytest.raises(VersionNotFoundError):
        store.read_dataset("acme", "d000099")
    with pytest.raises(VersionNotFoundError):
        store.put_dataset("acme", data, parent="d000099")


def test_bad_records_leave_no_version(store):
    store.create_tenant(TenantConfig(name="acme", base_model="m"))
    lines = [r.model_dump_json() for r in records(3)] + [records(1)[0].model_dump_json()]
    with pytest.raises(InvalidRecordsError, match="upload.jsonl:4: duplicate record id 'r0'"):
        store.put_dataset("acme", parse_jsonl(lines, source="upload.jsonl"))
    with pytest.raises(InvalidRecordsError, match="line|:2:"):
        store.put_dataset("acme", parse_jsonl(['{"id": "a", "prompt": "p", "response": "r"}', "{oops"]))
    assert store.list_data_versions("acme") == []
    assert all(i.key.endswith("/_claim.json") for i in store.io.list(store.layout.data_root("acme")))


def test_adapter_publish_download_verify(store, tmp_path):
    store.create_tenant(TenantConfig(name="acme", base_model="tiny-llama"))
    data = store.put_dataset("acme", records(4))
    assert store.next_adapter_version("acme") == "v000001"
    local = adapter_dir(tmp_path, weights=b"A" * 5000)
    v1 = store.publish_adapter("acme", local, AdapterManifest(data_version=data, path="train",
                                                               solver={"iterations": 0}))
    v2 = store.publish_adapter("acme", adapter_dir(tmp_path, b"B" * 10, "b"),
                               AdapterManifest(parent_version=v1, data_version=data, request_ids=["req-1"]))
    assert (v1, v2) == ("v000001", "v000002")
    assert store.list_adapter_versions("acme") == [v1, v2]
    manifest = store.get_adapter_manifest("acme", v1)
    assert manifest.version == v1 and manifest.tenant == "acme" and manifest.base_model == "tiny-llama"
    assert set(manifest.files) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert manifest.sha256 == manifest.files["adapter_model.safetensors"]
    path = store.download_adapter("acme", v1)
    assert (path / "adapter_model.safetensors").read_bytes() == b"A" * 5000
    assert json.loads((path / "eraser.json").read_text())["version"] == v1
    assert path.name == v1 and "acme" in path.parts
    assert store.download_adapter("acme", v1) == path  # cached
    other = store.download_adapter("acme", v2)
    assert other != path and (other / "adapter_model.safetensors").read_bytes() == b"B" * 10
    assert store.evict_adapter("acme", v1) and not path.exists()
    with pytest.raises(VersionNotFoundError):
        store.download_adapter("acme", "v000042")
    with pytest.raises(VersionNotFoundError):
        store.publish_adapter("acme", local, AdapterManifest(parent_version="v000042"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidAdapterError, match="lacks"):
        store.publish_adapter("acme", empty, AdapterManifest())


def test_head_compare_and_swap(store, tmp_path):
    data, v1, etag = onboard(store, tmp_path)
    head, read_etag = store.get_head("acme")
    assert head.adapter == v1 and head.data == data and read_etag == etag
    with pytest.raises(HeadConflictError):
        store.move_head("acme", Head(adapter=v1, data=data), None)  # exists already
    v2 = store.publish_adapter("acme", adapter_dir(tmp_path, b"2", "two"), AdapterManifest(data_version=data))
    new_etag = store.move_head("acme", Head(adapter=v2, data=data), etag)
    with pytest.raises(HeadConflictError, match="re-read"):
        store.move_head("acme", Head(adapter=v1, data=data), etag)  # stale ETag
    # moving back to identical versions still yields a distinct ETag (no ABA)
    back_etag = store.move_head("acme", Head(adapter=v1, data=data), new_etag)
    assert back_etag not in (etag, new_etag)
    with pytest.raises(VersionNotFoundError):
        store.move_head("acme", Head(adapter="v000099", data=data), back_etag)
    d2 = store.put_dataset("acme", records(2))
    with pytest.raises(ConflictError, match="reflects data"):
        store.move_head("acme", Head(adapter=v1, data=d2), back_etag)
    assert store.get_head("acme")[0].adapter == v1
    assert store.get_head("nobody") == (None, None)


def test_ledger_submit_is_idempotent(store, tmp_path):
    onboard(store, tmp_path)
    req = ErasureRequest(request_id="req-1", tenant="acme", kind="remove", records=["r1", "r2"])
    receipt, created = store.submit_erasure(req)
    assert created and receipt.status is ReceiptStatus.pending
    again, created_again = store.submit_erasure(req)
    assert not created_again and again.created_at == receipt.created_at
    with pytest.raises(ConflictError, match="already used"):
        store.submit_erasure(req.model_copy(update={"records": ["r3"]}))
    with pytest.raises(UnknownRecordError, match="nope"):
        store.submit_erasure(ErasureRequest(request_id="req-2", tenant="acme", kind="remove", records=["nope"]))
    with pytest.raises(ReceiptNotFoundError):
        store.get_receipt("acme", "req-2")  # a rejected submit records nothing
    with pytest.raises(TenantNotFoundError):
        store.submit_erasure(req.model_copy(update={"tenant": "nobody"}))


def test_receipts_save_list_and_cas(store, tmp_path):
    onboard(store, tmp_path)
    for i in range(3):
        store.submit_erasure(ErasureRequest(request_id=f"req-{i}", tenant="acme", kind="remove", records=[f"r{i}"]))
    receipt = store.get_receipt("acme", "req-1")
    receipt.transition("running", old_adapter_version="v000001", old_data_version="d000001")
    store.save_receipt(receipt)
    receipt.update(stages={"solve": 0.5})
    store.save_receipt(receipt)  # the saved ETag is tracked: a second save is fine
    assert store.get_receipt("acme", "req-1").stages == {"solve": 0.5}
    stale = store.get_receipt("acme", "req-2")
    store.update_receipt("acme", "req-2", lambda r: r.transition("rejected", error="no"))
    with pytest.raises(ConflictError, match="changed since it was read"):
        store.save_receipt(stale.transition("running"))
    assert [r.request_id for r in store.list_receipts("acme")] == ["req-0", "req-1", "req-2"]
    assert [r.request_id for r in store.list_receipts("acme", status="running")] == ["req-1"]
    assert [r.request_id for r in store.list_receipts("acme", ReceiptStatus.rejected)] == ["req-2"]


def test_models_upload_once_download_once(store, tmp_path):
    model = tmp_path / "tiny"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "tokenizer.json").write_text('{"t": 1}')
    manifest = store.put_model("tiny-llama", model)
    assert set(manifest.files) == {"config.json", "sub/tokenizer.json"}
    with pytest.raises(ConflictError):
        store.put_model("tiny-llama", model)
    assert store.list_models() == ["tiny-llama"]
    local = store.download_model("tiny-llama")
    assert (local / "sub" / "tokenizer.json").read_text() == '{"t": 1}'
    assert store.download_model("tiny-llama") == local
    assert store.resolve_base_model("tiny-llama") == local
    assert store.resolve_base_model(f"s3://{store.settings.bucket}/{store.layout.models_root()}tiny-llama") == local
    assert store.resolve_base_model(str(model)) == model
    with pytest.raises(VersionNotFoundError):
        store.download_model("absent")


def test_bucket_layout_is_exactly_designs(s3_server, tmp_path):
    """With an empty prefix, every key in the bucket sits where docs/architecture.md#s3-layout puts it."""
    store = TenantStore(s3_server.settings(bucket="eraser-layout", cache_dir=tmp_path / "cache"))
    store.ensure_bucket()
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    store.put_model("tiny-llama", model)
    data, adapter, _ = onboard(store, tmp_path)
    store.submit_erasure(ErasureRequest(request_id="req-1", tenant="acme", kind="remove", records=["r1"]))
    keys = sorted(info.key for info in store.io.list(""))
    assert keys == [
        "models/tiny-llama/config.json",
        "models/tiny-llama/eraser-model.json",
        "tenants/acme/HEAD.json",
        "tenants/acme/adapters/v000001/README.md",
        "tenants/acme/adapters/v000001/_claim.json",
        "tenants/acme/adapters/v000001/adapter_config.json",
        "tenants/acme/adapters/v000001/adapter_model.safetensors",
        "tenants/acme/adapters/v000001/eraser.json",
        "tenants/acme/data/d000001/_claim.json",
        "tenants/acme/data/d000001/dataset.json",
        "tenants/acme/data/d000001/part-00000.jsonl.gz",
        "tenants/acme/erasures/req-1.json",
        "tenants/acme/tenant.json",
    ]
    head = json.loads(store.io.get_bytes("tenants/acme/HEAD.json")[0])
    assert (head["adapter"], head["data"]) == (adapter, data)
    receipt = json.loads(store.io.get_bytes("tenants/acme/erasures/req-1.json")[0])
    assert receipt["request"]["request_id"] == "req-1" and receipt["status"] == "pending"


def test_large_files_go_up_in_parts_and_store_pickles(s3_server, s3_bucket, tmp_path):
    import pickle

    settings = s3_server.settings(bucket=s3_bucket, prefix=f"t-{uuid.uuid4().hex[:8]}",
                                  multipart_bytes=5 * 1024 * 1024, cache_dir=tmp_path / "cache")
    store = TenantStore(settings)
    store.create_tenant(TenantConfig(name="acme", base_model="m"))
    weights = bytes(range(256)) * (11 * 1024 * 1024 // 256 + 7)  # ~11 MiB: three parts
    version = store.publish_adapter("acme", adapter_dir(tmp_path, weights), AdapterManifest())
    clone = pickle.loads(pickle.dumps(store))  # e.g. shipped to a Ray task
    assert clone.settings == store.settings
    path = clone.download_adapter("acme", version)
    assert (path / "adapter_model.safetensors").read_bytes() == weights
