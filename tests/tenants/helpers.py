"""Small builders shared by the tenant tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tenants.models import AdapterManifest, Head, Record, TenantConfig


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
