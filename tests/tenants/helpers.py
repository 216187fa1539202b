"""Small builders shared by the tenant tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tenants.models import AdapterManifest, ErasureRequest, Head, Record, TenantConfig


def records(n: int = 6, subjects: int = 3) -> list[Record]:
    return [
        Record(id=f"r{i}", subject=f"user{i % subjects}", prompt=f"What is the code of item {i}?", response=f"code-{i}")
        for i in range(n)
    ]


def adapter_dir(root: Path, weights: bytes = b"\x00weights\x01" * 100, name: str = "adapter") -> Path:
    """A minimal PEFT-shaped directory (config + weights + a tokenizer file)."""
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16, "peft_type": "LORA"}')
    (path / "adapter_model.safetensors").write_bytes(weights)
    (path / "README.md").write_text("test adapter\n")
    return path


def onboard(store: Any, tmp_path: Path, tenant: str = "acme", n: int = 6) -> tuple[str, str, str]:
    """Create a tenant with data d1, adapter v1 and HEAD on them; returns (data, adapter, etag)."""
    store.create_tenant(TenantConfig(name=tenant, base_model="tiny-llama"))
    data = store.put_dataset(tenant, records(n))
    adapter = store.publish_adapter(
        tenant, adapter_dir(tmp_path, name=f"{tenant}-v1"), AdapterManifest(data_version=data, path="train")
    )
    etag = store.move_head(tenant, Head(adapter=adapter, data=data), None)
    return data, adapter, etag


def erase_r1(store: Any, tmp_path: Path) -> tuple[str, str, str, str]:
    """Onboard acme, then erase record r1 as the service does (receipt running, new data and adapter,
    HEAD moved, receipt published); returns (old data, old adapter, new data, new adapter)."""
    d1, v1, etag = onboard(store, tmp_path)
    request = ErasureRequest(request_id="req-1", tenant="acme", kind="remove", records=["r1"])
    receipt, _ = store.submit_erasure(request)
    receipt.transition("running", old_adapter_version=v1, old_data_version=d1)
    store.save_receipt(receipt)
    selected = request.resolve(store.iter_dataset("acme", d1))
    d2 = store.put_dataset("acme", request.apply(store.iter_dataset("acme", d1), selected), parent=d1,
                           request_ids=[request.request_id])
    v2 = store.publish_adapter("acme", adapter_dir(tmp_path, b"erased", "v2"),
                               AdapterManifest(parent_version=v1, data_version=d2, request_ids=["req-1"], path="influence"))
    store.move_head("acme", Head(adapter=v2, data=d2), etag)
    receipt.transition("published", new_adapter_version=v2, new_data_version=d2, records_affected=selected)
    store.save_receipt(receipt)
    return d1, v1, d2, v2
