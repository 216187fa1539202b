"""cluster/ imports eraser, tenants and ray; never the layers above it (serve, cli) or benchmarks."""

from __future__ import annotations

import ast
from pathlib import Path

import cluster

FORBIDDEN = {"serve", "cli", "benchmarks", "vllm", "fastapi"}
PACKAGE = Path(cluster.__path__[0])


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_cluster_never_imports_an_upper_layer():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) >= 8
    for path in files:
        bad = imported_roots(path) & FORBIDDEN
        assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {sorted(bad)}"
