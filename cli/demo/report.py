"""What the demo tells: the report of checked steps (``demo-report.json``) and the lines it prints.

A :class:`Step` is a check that passed or failed; a :func:`stage` is only a heading with its duration.
The report's JSON shape: ``{"ok": bool, "steps": [{"name", "ok", "detail"}], "summary": {...}}``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator


@dataclass
class Step:
    """One demo step's outcome: what the CI test checks."""

    name: str
    ok: bool
    detail: dict = field(default_factory=dict)


@dataclass
class DemoReport:
    steps: list[Step] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    def add(self, name: str, ok: bool, **detail: Any) -> Step:
        step = Step(name, bool(ok), detail)
        self.steps.append(step)
        mark = "ok " if ok else "FAIL"
        say(f"[{mark}] {name}")
        return step

    @property
    def ok(self) -> bool:
        return all(step.ok for step in self.steps)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "steps": [asdict(s) for s in self.steps], "summary": self.summary}


def say(message: str) -> None:
    print(message, flush=True)


@contextlib.contextmanager
def stage(title: str) -> Iterator[None]:
    say(f"\n== {title}")
    started = time.perf_counter()
    yield
    say(f"   ({time.perf_counter() - started:.1f}s)")
