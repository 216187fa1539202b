"""tenants/ imports boto3 and pydantic only: never torch, ray, or the layers above it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tenants

FORBIDDEN = {"torch", "ray", "transformers", "peft", "vllm", "numpy", "eraser", "cluster", "serve", "cli"}
PACKAGE = Path(tenants.__path__[0])


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_sources_never_import_forbidden_packages():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) >= 8
    for path in files:
        bad = imported_roots(path) & FORBIDDEN
        assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {sorted(bad)}"


def test_importing_everything_loads_no_torch_or_ray():
    code = (
        "import sys, tenants, tenants.store, tenants.embedded, tenants.retention, tenants.keys\n"
        "bad = sorted(m for m in ('torch', 'ray', 'transformers', 'vllm') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)
