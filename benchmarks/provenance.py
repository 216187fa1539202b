"""What every benchmark's JSON records besides its numbers, and how it is written: the versions and the
git commit that produced it (dirty or not), the machine and its load, values made JSON-safe (NaN and
infinities become null), and the command line's options over a preset."""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Mapping

from eraser.update import json_safe as _json_safe

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "transformers", "peft", "numpy", "scipy", "rouge-score", "matplotlib")


def versions() -> dict:
    """Python and package versions, and the commit (``git_dirty``: eraser/ or benchmarks/ code had edits)."""
    found: dict[str, Any] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    try:
        found["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                             timeout=10).stdout.strip() or None
        # Code edits only: the results this run (or an earlier one) writes do not make the code dirty.
        found["git_dirty"] = bool(subprocess.run(
            ["git", "status", "--porcelain", "--", "eraser", "benchmarks", ":(exclude)benchmarks/results"],
            cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        found["git_commit"] = None
    return found


def machine() -> dict:
    """CPUs, platform and load average: a timing measured on a loaded machine says so."""
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average": load}


def json_safe(value):
    """``value`` as strict JSON takes it (:func:`eraser.update.json_safe`), tensors dropped."""
    return _json_safe(value, drop_tensors=True)


def options_from_args(options_type: type, presets: Mapping[str, Mapping[str, Any]], args: argparse.Namespace,
                      keep_false: tuple[str, ...] = ()):
    """``options_type`` (a dataclass) from the preset ``args.preset`` names, overridden by every option given
    on the command line (None and an unset ``store_true`` mean not given; ``keep_false`` names the options
    whose False is a choice, e.g. ``--no-noise-floor``)."""
    values = dict(presets[args.preset]) if getattr(args, "preset", None) else {}
    for name in options_type.__dataclass_fields__:
        given = getattr(args, name, None)
        if given is not None and (given is not False or name in keep_false):
            values[name] = given
    return options_type(**values)
