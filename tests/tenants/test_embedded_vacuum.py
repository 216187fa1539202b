"""The embedded SeaweedFS does not keep purged bytes on disk: deleted objects stay in its volume
files until a vacuum, which the embedded server runs on any garbage (every minute, or vacuum())."""

from __future__ import annotations

import time

from tenants.embedded import VACUUM_INTERVAL_S, EmbeddedS3
from tenants.store import TenantStore


def on_disk(root, needle: bytes) -> list[str]:
    return [p.name for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_deleted_objects_leave_the_disk_after_vacuum_and_current_ones_stay(tmp_path):
    secret = b"ERASED-RECORD-" + b"x" * 200
    with EmbeddedS3(tmp_path / "s3") as server:
        store = TenantStore(server.settings(bucket="vacuum"))
        store.ensure_bucket()
        for i in range(3):
            store.io.put_bytes(f"gone/{i}", secret + bytes([i]) * 100)
        store.io.put_bytes("kept", b"KEPT-OBJECT" * 20)
        store.io.delete_keys([f"gone/{i}" for i in range(3)])
        time.sleep(0.5)
        assert on_disk(server.data_dir, secret), "SeaweedFS keeps deleted bytes until a vacuum"
        deadline = time.monotonic() + 30
        while True:  # the master learns of deletions from the volume server's heartbeat: may take a few s
            server.vacuum()
            if not on_disk(server.data_dir, secret) or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        assert not on_disk(server.data_dir, secret)
        assert store.io.get_bytes("kept")[0] == b"KEPT-OBJECT" * 20
        assert f"-master.vacuumIntervalSeconds={VACUUM_INTERVAL_S}" in server._command("weed")
