"""Per-replica adapter registry: which adapter version serves each tenant, and live switching.

The rules (docs/operations.md#pitfalls-of-the-stack says why vLLM needs each one):

1. Each adapter version a replica loads gets a new LoRA name (``<tenant>@<version>``), a new
   ``lora_int_id`` (monotonic within the replica, never reused) and its own local directory
   (one per tenant and version, private to the replica).
2. A request *leases* the tenant's current version when it starts and keeps it until it ends, so a
   request that started on version k finishes on version k.
3. When HEAD moves, the new version is loaded first, then becomes current: requests that start from
   then on use it. The old version is retired: once its last lease ends it is removed from the
   engine (``remove_lora``) and its local files are deleted. Its KV blocks are not flushed: vLLM keys a
   cached block by the LoRA's name and path, both new per version and never reused, so no request can
   hit them again and they are recycled as memory is needed. vLLM's only flush (``reset_prefix_cache``)
   is global and clears hashes, not memory: it would drop every tenant's prefix cache and, to succeed
   under load, preempt every running request, while the blocks' contents stayed until reuse anyway.

Versions are loaded lazily (a tenant's first request on a replica) and refreshed by a loop that
polls HEAD every ``refresh_interval_s`` seconds, or at once by :meth:`AdapterRegistry.refresh`
(the erasure path calls it through the adapter board right after publishing).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import AsyncIterator, Callable

from serve import metrics
from serve.engine import AdapterRef, Engine
from serve.errors import AdapterLoadError, NoAdapterError

logger = logging.getLogger(__name__)


class ReplicaCache:
    """The adapter directory of one engine replica, ``<root>/<replica>``, and the sweep of dead ones.

    A replica holds ``<root>/<replica>.lock`` with ``flock`` for its whole life (the kernel releases
    it when the process dies, SIGKILL included), taken *before* its directory exists. At start every
    directory under ``root`` whose lock is free belongs to a replica that is gone (crashed, scaled
    down, or from a version without locks) and is deleted with its pre-erasure weights; at stop the
    replica deletes its own. Replicas of one node share ``root`` safely: a live one's lock is held.
    """

    def __init__(self, root: Path, replica: str) -> None:
        self.root = Path(root)
        self.replica = replica
        self.path = self.root / replica
        self._lock_file = None

    def open(self) -> Path:
        """Take this replica's lock, sweep the dead replicas' directories, create ours; returns it."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        handle = open(self.root / f"{self.replica}.lock", "a")
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # replica ids are unique: never held by another
        self._lock_file = handle
        swept = self.sweep()
        if swept:
            logger.info("replica %s: deleted the adapter caches of %d replicas that are gone: %s",
                        self.replica, len(swept), swept)
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    def sweep(self) -> list[str]:
        """Delete every replica directory under ``root`` whose owner is gone; returns their names."""
        import fcntl
        import shutil

        swept = []
        for entry in sorted(self.root.iterdir()):
            if not entry.is_dir() or entry.name == self.replica:
                continue
            lock_path = self.root / f"{entry.name}.lock"
            with open(lock_path, "a") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live replica
                shutil.rmtree(entry, ignore_errors=True)
                lock_path.unlink(missing_ok=True)  # under the lock: no one can be waiting for it
            swept.append(entry.name)
        return swept

    def close(self) -> None:
        """Delete this replica's directory, then release its lock."""
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock_file is not None:
            (self.root / f"{self.replica}.lock").unlink(missing_ok=True)
            self._lock_file.close()
            self._lock_file = None


class AdapterSource(abc.ABC):
    """Where adapter versions come from. Blocking methods: the registry runs them in a thread."""

    @abc.abstractmethod
    def head_version(self, tenant: str) -> str | None:
        """The tenant's live adapter version (HEAD), None if it has none yet."""

    @abc.abstractmethod
    def fetch(self, tenant: str, version: str) -> Path:
        """A local directory holding this version, private to this replica (downloaded, verified)."""

    @abc.abstractmethod
    def discard(self, tenant: str, version: str) -> None:
        """Delete this replica's local copy of the version."""


class StoreAdapterSource(AdapterSource):
    """Adapter versions from the tenant store; ``store`` must use a cache directory of this replica alone."""

    def __init__(self, store) -> None:
        self.store = store

    def head_version(self, tenant: str) -> str | None:
        head, _ = self.store.get_head(tenant)
        return head.adapter if head is not None else None

    def fetch(self, tenant: str, version: str) -> Path:
        return Path(self.store.download_adapter(tenant, version))

    def discard(self, tenant: str, version: str) -> None:
        self.store.evict_adapter(tenant, version)


@dataclass
class LoadedVersion:
    """One adapter version held by this replica."""

    tenant: str
    version: str
    ref: AdapterRef
    loaded_at: float  # time.time()
    active: int = 0  # requests holding a lease on it
    used_at: float = 0.0  # time.monotonic() of the last lease taken or given back
    retired_at: float | None = None  # when a newer version became current
    dropped_at: float | None = None  # when it left the engine and the disk
    dropping: bool = False
    dropped: asyncio.Event = field(default_factory=asyncio.Event, repr=False)


@dataclass(frozen=True)
class SwitchEvent:
    """What one refresh did on this replica. Times are Unix seconds."""

    tenant: str
    replica: str
    old_version: str | None  # version serving before (None: this replica did not hold the tenant)
    new_version: str | None  # version serving after (None: the tenant has no HEAD any more)
    started_at: float  # refresh started (HEAD read)
    serving_at: float  # new requests use new_version from here on
    dropped_at: float | None  # old version removed from the engine and its files deleted
    in_flight: int  # requests still running on the old version when it was retired

    @property
    def changed(self) -> bool:
        return self.old_version != self.new_version

    def to_dict(self) -> dict:
        return asdict(self)


class AdapterRegistry:
    """The adapter versions one engine replica serves, switched live when a tenant's HEAD moves."""

    def __init__(
        self,
        engine: Engine,
        source: AdapterSource,
        *,
        refresh_interval_s: float = 5.0,
        idle_forget_s: float | None = None,
        replica: str = "replica",
        on_forget: Callable[[str], None] | None = None,
    ) -> None:
        self.engine = engine
        self.on_forget = on_forget  # told, at once, when a tenant stops being held here (serve.routing)
        self.source = source
        self.refresh_interval_s = refresh_interval_s
        self.idle_forget_s = idle_forget_s
        self.replica = replica
        self._ids = itertools.count(1)
        self._current: dict[str, LoadedVersion] = {}
        self._retired: list[LoadedVersion] = []
        self._locks: dict[str, asyncio.Lock] = {}
        self._last_switch: dict[str, SwitchEvent] = {}
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None

    # -- requests -----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(self, tenant: str) -> AsyncIterator[AdapterRef]:
        """The tenant's current version, held until the block ends (loads it on first use).

        NoAdapterError if the tenant has no published adapter; AdapterLoadError if it cannot be loaded.
        """
        loaded = self._current.get(tenant)
        if loaded is None:
            loaded = await self._load_current(tenant)
        loaded.active += 1  # no await between reading _current and taking the lease
        loaded.used_at = time.monotonic()
        try:
            yield loaded.ref
        finally:
            loaded.active -= 1
            loaded.used_at = time.monotonic()
            if loaded.retired_at is not None and loaded.active == 0:
                self._spawn(self._drop(loaded))

    async def _load_current(self, tenant: str) -> LoadedVersion:
        async with self._lock(tenant):
            loaded = self._current.get(tenant)
            if loaded is not None:  # loaded while we waited for the lock
                return loaded
            version = await asyncio.to_thread(self.source.head_version, tenant)
            if version is None:
                raise NoAdapterError(f"tenant {tenant!r} has no published adapter yet")
            loaded = await self._load(tenant, version)
            self._current[tenant] = loaded
            return loaded

    # -- switching ----------------------------------------------------------------------------

    async def refresh(self, tenant: str, *, load_if_absent: bool = False, wait_dropped: bool = True,
                      timeout: float | None = None) -> SwitchEvent:
        """Re-read the tenant's HEAD and switch to it if it moved; returns what happened here.

        A replica that does not hold the tenant loads nothing (its first request will load HEAD)
        unless ``load_if_absent``. With ``wait_dropped`` it returns only after the old version is
        gone (its in-flight requests finished), or after ``timeout`` seconds with ``dropped_at`` None.
        If HEAD did not move, the event of the switch that made it current here is returned.
        """
        started = time.time()
        async with self._lock(tenant):
            head = await asyncio.to_thread(self.source.head_version, tenant)
            old = self._current.get(tenant)
            if old is not None and old.version == head:
                last = self._last_switch.get(tenant)
                if last is not None and last.new_version == head:
                    return await self._settled(last, wait_dropped, timeout)
                return SwitchEvent(tenant, self.replica, head, head, started, old.loaded_at, None, 0)
            if old is None and not load_if_absent:
                now = time.time()
                return SwitchEvent(tenant, self.replica, None, head, started, now, now, 0)
            new = await self._load(tenant, head) if head is not None else None
            if new is not None:
                self._current[tenant] = new
            else:
                self._current.pop(tenant, None)
                self._forgot(tenant)
            serving_at = time.time()
            in_flight = old.active if old is not None else 0
            event = SwitchEvent(tenant, self.replica, old.version if old else None, head, started, serving_at,
                                None if old else serving_at, in_flight)
            self._last_switch[tenant] = event
            if old is not None:
                self._retire(old, serving_at)
            metrics.adapter_switched(tenant, serving_at - started)
            logger.info("tenant %s: replica %s serves %s (was %s; %d requests still on it)",
                        tenant, self.replica, head, event.old_version, in_flight)
        return await self._settled(event, wait_dropped, timeout)

    async def _settled(self, event: SwitchEvent, wait: bool, timeout: float | None) -> SwitchEvent:
        """``event`` with ``dropped_at`` filled in once its old version is gone (waiting if asked)."""
        if event.dropped_at is not None or event.old_version is None:
            return event
        old = next((v for v in self._retired if v.tenant == event.tenant and v.version == event.old_version
                    and v.retired_at == event.serving_at), None)
        if old is not None and wait and not old.dropped.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(old.dropped.wait(), timeout)
        last = self._last_switch.get(event.tenant)
        return last if last is not None and last.serving_at == event.serving_at else event

    async def refresh_all(self) -> list[SwitchEvent]:
        """Forget the tenants idle past ``idle_forget_s`` (:meth:`forget_idle`), then refresh every tenant
        this replica still holds (errors are logged, the old version keeps serving)."""
        await self.forget_idle()
        events = []
        for tenant in list(self._current):
            try:
                events.append(await self.refresh(tenant, wait_dropped=False))
            except Exception as error:
                logger.warning("tenant %s: refresh on replica %s failed: %s", tenant, self.replica, error)
        return events

    async def forget_idle(self) -> list[str]:
        """Drop the versions of tenants no request used for ``idle_forget_s`` seconds (from the engine and
        the disk), so a replica polls HEAD and keeps adapter files only for tenants it serves now, not
        for every tenant it ever served; the next request loads HEAD afresh. Returns the tenants dropped."""
        if self.idle_forget_s is None:
            return []
        cutoff = time.monotonic() - self.idle_forget_s

        def idle(tenant: str, loaded: LoadedVersion) -> bool:
            return self._current.get(tenant) is loaded and not loaded.active and loaded.used_at <= cutoff

        forgotten = []
        for tenant, loaded in list(self._current.items()):
            if not idle(tenant, loaded):
                continue
            async with self._lock(tenant):
                if not idle(tenant, loaded):
                    continue  # used, or switched, while we waited for the lock
                del self._current[tenant]
                self._forgot(tenant)
                self._last_switch.pop(tenant, None)
                loaded.retired_at = time.time()
                self._retired.append(loaded)
                try:  # under the lock: a request that loads the same version again waits for its files to go
                    await self._drop(loaded)
                except Exception:  # logged by _drop; the files go with the replica's cache at the latest
                    continue
            forgotten.append(tenant)
            logger.info("tenant %s: replica %s forgot adapter %s (idle over %gs)", tenant, self.replica,
                        loaded.version, self.idle_forget_s)
        return forgotten

    def start(self) -> None:
        """Start the background loop that polls HEAD every ``refresh_interval_s`` seconds."""
        if self._loop_task is None and self.refresh_interval_s > 0:
            self._loop_task = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval_s)
            await self.refresh_all()

    # -- loading and dropping -----------------------------------------------------------------

    async def _load(self, tenant: str, version: str) -> LoadedVersion:
        started = time.perf_counter()
        try:
            path = await asyncio.to_thread(self.source.fetch, tenant, version)
        except Exception as error:
            raise AdapterLoadError(f"tenant {tenant!r} adapter {version}: download failed: {error}") from error
        ref = AdapterRef(name=f"{tenant}@{version}", int_id=next(self._ids), path=str(path))
        await self.engine.add_adapter(ref)
        seconds = time.perf_counter() - started
        metrics.adapter_loaded(tenant, seconds)
        logger.info("tenant %s: adapter %s loaded as lora id %d from %s (%.2fs)",
                    tenant, version, ref.int_id, path, seconds)
        return LoadedVersion(tenant=tenant, version=version, ref=ref, loaded_at=time.time(), used_at=time.monotonic())

    def _retire(self, old: LoadedVersion, when: float) -> None:
        old.retired_at = when
        self._retired.append(old)
        if old.active == 0:
            self._spawn(self._drop(old))

    async def _drop(self, old: LoadedVersion) -> None:
        """Remove a retired version from the engine and the disk (its KV blocks: see the module docstring)."""
        if old.dropping:
            return
        old.dropping = True
        try:
            await self.engine.remove_adapter(old.ref.int_id)
            await asyncio.to_thread(self.source.discard, old.tenant, old.version)
        except Exception:
            old.dropping = False
            logger.exception("tenant %s: dropping adapter %s failed", old.tenant, old.version)
            raise
        old.dropped_at = time.time()
        last = self._last_switch.get(old.tenant)
        if last is not None and last.old_version == old.version and last.serving_at == old.retired_at:
            self._last_switch[old.tenant] = replace(last, dropped_at=old.dropped_at)
        self._retired.remove(old)
        old.dropped.set()
        metrics.adapter_dropped(old.tenant, old.dropped_at - (old.retired_at or old.dropped_at))
        logger.info("tenant %s: adapter %s (lora id %d) removed from engine and disk",
                    old.tenant, old.version, old.ref.int_id)

    def _forgot(self, tenant: str) -> None:
        """Tell ``on_forget`` that the tenant left ``_current`` (synchronously: no request can take a lease
        between the two, so a request that loads the tenant again is reported after this)."""
        if self.on_forget is not None:
            try:
                self.on_forget(tenant)
            except Exception:
                logger.exception("tenant %s: on_forget failed on replica %s", tenant, self.replica)

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _lock(self, tenant: str) -> asyncio.Lock:
        return self._locks.setdefault(tenant, asyncio.Lock())

    # -- inspection ---------------------------------------------------------------------------

    def current_version(self, tenant: str) -> str | None:
        loaded = self._current.get(tenant)
        return loaded.version if loaded else None

    def last_switch(self, tenant: str) -> SwitchEvent | None:
        return self._last_switch.get(tenant)

    def snapshot(self) -> dict:
        """What this replica holds: current and retired versions, their ids, paths and leases."""

        def describe(v: LoadedVersion) -> dict:
            return {"version": v.version, "lora_name": v.ref.name, "lora_int_id": v.ref.int_id, "path": v.ref.path,
                    "active": v.active, "loaded_at": v.loaded_at, "retired_at": v.retired_at}

        return {
            "replica": self.replica,
            "current": {t: describe(v) for t, v in self._current.items()},
            "retired": [dict(describe(v), tenant=v.tenant) for v in self._retired],
            "last_switch": {t: e.to_dict() for t, e in self._last_switch.items()},
        }
