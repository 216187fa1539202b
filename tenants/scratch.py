"""Private local directories for copies of tenant data (a job's parent adapter, ...) that never
outlive their process: each holds ``.alive`` under ``flock`` for the process's life (the kernel frees
it on any death, SIGKILL included), and making one first deletes those of the same prefix whose lock
is free, i.e. whose process is gone."""

from __future__ import annotations

import fcntl
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)

LOCK_FILE = ".alive"
YOUNG_S = 60.0  # a directory this new may still be taking its lock: never swept


class PrivateDir:
    """``PrivateDir("eraser-job-cache-")``: a fresh directory under the temp root, ``path``; ``close()`` deletes it."""

    def __init__(self, prefix: str, root: str | Path | None = None) -> None:
        self.root = Path(root or tempfile.gettempdir())
        swept = sweep(prefix, self.root)
        if swept:
            logger.info("deleted %d private directories of processes that are gone: %s", len(swept), swept)
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=self.root))
        self._lock: IO | None = open(self.path / LOCK_FILE, "a")
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def sweep(prefix: str, root: str | Path | None = None, young_s: float = YOUNG_S) -> list[str]:
    """Delete the directories ``<root>/<prefix>*`` whose process is gone; returns their names."""
    root = Path(root or tempfile.gettempdir())
    swept = []
    for path in sorted(root.glob(f"{prefix}*")):
        try:
            if not path.is_dir() or time.time() - path.stat().st_mtime < young_s:
                continue
            with open(path / LOCK_FILE, "a") as handle:  # none (from before locks): the owner is gone too
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # alive
                shutil.rmtree(path, ignore_errors=True)
        except OSError as error:  # another sweeper got there first, or not ours to delete
            logger.debug("not swept %s: %s", path, error)
            continue
        swept.append(path.name)
    return swept
