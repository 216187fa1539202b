"""Engine replicas leave no adapter files behind: a crashed (SIGKILLed) replica's cache is swept by
the next replica to start on the node, a live one's is kept, and a replica deletes its own at stop."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

from serve.adapters import ReplicaCache
from tests.serve.fakes import FakeEngine
from tests.serve.local_ingress import serve_config
from tests.tenants.helpers import onboard

HOLD = """
import sys, time
from pathlib import Path
from serve.adapters import ReplicaCache
cache = ReplicaCache(Path(sys.argv[1]), sys.argv[2])  # kept: its lock lives as long as it does
path = cache.open()
(path / "tenants" / "acme" / "adapters" / "v000001").mkdir(parents=True)
(path / "tenants" / "acme" / "adapters" / "v000001" / "adapter_model.safetensors").write_bytes(b"pre-erasure")
print("ready", flush=True)
time.sleep(600)
"""


def hold(root, replica) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(root), replica], stdout=subprocess.PIPE,
                               cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert process.stdout.readline().strip() == b"ready"
    return process


def test_a_killed_replicas_cache_is_swept_at_the_next_start_and_a_live_ones_kept(tmp_path):
    root = tmp_path / "replicas"
    dead, alive = hold(root, "dead-1"), hold(root, "alive-1")
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait(10)
        (root / "legacy-0" / "tenants").mkdir(parents=True)  # a cache from before locks existed
        assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["alive-1", "dead-1", "legacy-0"]
        cache = ReplicaCache(root, "new-1")
        cache.open()
        assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["alive-1", "new-1"]
        assert (root / "alive-1" / "tenants" / "acme" / "adapters" / "v000001").is_dir()
        cache.close()
        assert sorted(p.name for p in root.iterdir()) == ["alive-1", "alive-1.lock"]
    finally:
        alive.kill()
        alive.wait(10)


def test_engine_replica_sweeps_at_start_and_deletes_its_adapters_at_stop(store, tmp_path):
    from serve.engine_server import EngineServer

    onboard(store, tmp_path, "acme")
    config = serve_config(store, tmp_path)
    stale = config.adapter_dir / "crashed-replica" / "x" / "tenants" / "acme" / "adapters" / "v000001"
    stale.mkdir(parents=True)

    async def main():
        server = EngineServer.__new__(EngineServer)
        await server.__init__(config, board=None, engine=FakeEngine())
        assert not stale.exists() and not (config.adapter_dir / "crashed-replica").exists()
        job = {"tenant": "acme", "request_id": "r", "prompt": "hi", "options": {"max_tokens": 1}}
        assert [item async for item in server.generate(job)][-1]["chunk"]["finish_reason"] == "length"
        files = (await server.inspect())["adapter_files"]
        assert files and server.adapter_dir.is_dir()
        started = time.perf_counter()
        await server.__del__()
        return server.adapter_dir, time.perf_counter() - started

    own, seconds = asyncio.run(main())
    assert not own.exists() and list(config.adapter_dir.iterdir()) == []
    assert seconds < 5
