"""Private scratch directories (a job's copy of the parent adapter) do not outlive their process:
a SIGKILLed owner's directory is deleted when the next one is made, a live owner's is kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tenants.scratch import LOCK_FILE, PrivateDir, sweep

HOLD = """
import sys, time
from tenants.scratch import PrivateDir
scratch = PrivateDir("eraser-job-cache-", sys.argv[1])
(scratch.path / "adapter_model.safetensors").write_bytes(b"parent adapter, pre-erasure")
print(scratch.path, flush=True)
time.sleep(600)
"""


def hold(root) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": os.getcwd()})
    return process, process.stdout.readline().decode().strip()


def age(path, seconds: float = 3600) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_a_killed_jobs_scratch_is_swept_by_the_next_and_a_live_ones_kept(tmp_path):
    (killed, dead_dir), (alive, live_dir) = hold(tmp_path), hold(tmp_path)
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        legacy = tmp_path / "eraser-job-cache-legacy"  # from before locks: no lock file
        legacy.mkdir()
        young = tmp_path / "eraser-job-cache-young"  # may be taking its lock right now
        young.mkdir()
        for path in (dead_dir, live_dir, legacy):
            age(path)
        scratch = PrivateDir("eraser-job-cache-", tmp_path)
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted([os.path.basename(live_dir), "eraser-job-cache-young", scratch.path.name])
        assert (scratch.path / LOCK_FILE).is_file()
        scratch.close()
        assert not scratch.path.exists()
        assert sweep("eraser-job-cache-", tmp_path, young_s=0) == ["eraser-job-cache-young"]
    finally:
        alive.kill()
        alive.wait(10)


def test_cluster_job_stores_use_a_swept_private_dir(s3_server, s3_bucket, tmp_path, monkeypatch):
    import tempfile

    from cluster.jobs import _Stores

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale = tmp_path / "eraser-job-cache-crashed"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"pre-erasure")
    age(stale)
    stores = _Stores(s3_server.settings(bucket=s3_bucket))
    assert not stale.exists() and stores.private_dir.parent == tmp_path
    assert stores.private.settings.cache_dir == stores.private_dir
    stores.close()
    assert not stores.private_dir.exists()
