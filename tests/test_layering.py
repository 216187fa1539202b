"""docs/architecture.md#layers, checked on the source: serve -> cluster -> eraser; serve, cluster -> tenants.
The one layering test: every package's forbidden imports here, and tenants/ loading without torch or Ray."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "eraser": {"ray", "boto3", "botocore", "serve", "cluster", "tenants", "vllm", "fastapi", "cli", "pydantic"},
    "tenants": {"torch", "numpy", "ray", "eraser", "cluster", "serve", "vllm", "transformers", "peft", "cli"},
    "cluster": {"serve", "vllm", "fastapi", "cli", "benchmarks"},
    "serve": {"cli", "eraser"},  # serve reaches the method only through cluster
}
# The merged cluster/ and tenants/ copies of this test asked for at least 8 modules.
MIN_MODULES = {"cluster": 8, "tenants": 8}


def imported_top_levels(path: Path) -> set[str]:
    """The top-level packages a module imports absolutely (``import a.b``, ``from a.b import c``: ``a``);
    also tests/test_device_check.py's check of what the accelerator script imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_the_layering(package):
    offenders = {}
    files = sorted((ROOT / package).rglob("*.py"))
    least = MIN_MODULES.get(package, 5)
    assert len(files) >= least, f"{package}/ has only {len(files)} modules (at least {least}): is the path right?"
    for path in files:
        bad = imported_top_levels(path) & FORBIDDEN[package]
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, f"{package}/ imports what docs/architecture.md#layers forbids: {offenders}"


def test_importing_the_store_loads_no_torch_or_ray():
    """What the AST check cannot see: an import chain through a third-party package."""
    code = (
        "import sys, tenants, tenants.store, tenants.embedded, tenants.retention, tenants.keys\n"
        "bad = sorted(m for m in ('torch', 'ray', 'transformers', 'vllm') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
