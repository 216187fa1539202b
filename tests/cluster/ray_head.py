"""A Ray head of the test session's own: ``ray start --head`` on explicit free ports and its own temp dir.

Stopped by killing exactly the processes it started (every process whose command line names its
temp dir, and their descendants), never ``ray stop``, which kills every Ray on the machine.
``RAY_AUTH_MODE=disabled`` so ``ray job submit`` works without a token (docs/operations.md#pitfalls-of-the-stack); ``RAY_ADDRESS``
in its environment so Train's helpers that look the cluster up never find another engineer's.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cluster.config import IDLE_JOB_WORKERS, IDLE_WORKERS_ENV

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


def free_ports(count: int) -> list[int]:
    ports: list[int] = []
    sockets = []
    try:
        while len(ports) < count:
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            sockets.append(probe)
            ports.append(probe.getsockname()[1])
    finally:
        for probe in sockets:
            probe.close()
    return ports


def worker_port_range(width: int = 200) -> tuple[int, int]:
    """A block of ports that are free now (Ray's workers take theirs from it), below the ephemeral
    range (where the single ports come from) and SeaweedFS's 20000-40000."""
    for _ in range(200):
        start = 10000 + (uuid.uuid4().int % 9000)
        if all(_free(p) for p in range(start, start + width, 20)):
            return start, start + width - 1
    raise RuntimeError("no free block of worker ports")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class RayHead:
    num_cpus: int = 2
    temp_dir: Path = field(default_factory=lambda: Path(f"/tmp/rt-{uuid.uuid4().hex[:6]}"))  # short: socket paths
    port: int = 0
    dashboard_port: int = 0
    metrics_port: int = 0  # Prometheus export of the head node's metrics agent (Ray's and the service's)
    env: dict = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self) -> "RayHead":
        ports = free_ports(9)
        self.port, self.dashboard_port, self.metrics_port = ports[0], ports[1], ports[7]
        low, high = worker_port_range()
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "disabled",
            "RAY_ADDRESS": self.address,
            "PYTHONPATH": str(REPO),  # test modules (hooks defined in tests) importable by workers
            "OMP_NUM_THREADS": "1",
            "RAY_TRAIN_V2_ENABLED": "1",
        }
        self.env.setdefault(IDLE_WORKERS_ENV, str(IDLE_JOB_WORKERS))  # as the product's nodes: warm job workers
        command = [
            RAY, "start", "--head", f"--port={self.port}", f"--num-cpus={self.num_cpus}", "--num-gpus=0",
            f"--temp-dir={self.temp_dir}", "--node-ip-address=127.0.0.1", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={ports[2]}", f"--node-manager-port={ports[3]}",
            f"--object-manager-port={ports[4]}", f"--dashboard-agent-listen-port={ports[5]}",
            f"--dashboard-agent-grpc-port={ports[6]}", f"--metrics-export-port={ports[7]}",
            f"--runtime-env-agent-port={ports[8]}", f"--min-worker-port={low}", f"--max-worker-port={high}",
            "--object-store-memory=300000000", "--disable-usage-stats",
        ]
        started = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=180)
        if started.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed ({started.returncode}): {started.stdout[-2000:]} {started.stderr[-2000:]}")
        return self

    def processes(self) -> list[int]:
        """PIDs started by this head: command lines naming its temp dir, and all their descendants."""
        table: dict[int, tuple[int, str]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            table[int(entry)] = (parent, command)
        marker = str(self.temp_dir)
        tree = {pid for pid, (_, command) in table.items() if marker in command and pid != os.getpid()}
        grew = True
        while grew:
            grew = False
            for pid, (parent, _) in table.items():
                if parent in tree and pid not in tree:
                    tree.add(pid)
                    grew = True
        return sorted(tree)

    def stop(self, grace: float = 5.0) -> None:
        pids = self.processes()
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.2)
        for pid in pids:
            if _alive(pid):
                _signal(pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
