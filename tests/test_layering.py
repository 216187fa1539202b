"""docs/architecture.md#layers, checked on the source: serve -> cluster -> eraser; serve, cluster -> tenants."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "eraser": {"ray", "boto3", "botocore", "serve", "cluster", "tenants", "vllm", "fastapi", "cli", "pydantic"},
    "tenants": {"torch", "ray", "eraser", "cluster", "serve", "vllm", "transformers", "peft", "cli"},
    "cluster": {"serve", "vllm", "cli"},
    "serve": {"cli", "eraser"},  # serve reaches the method only through cluster
}


def imported_top_levels(path: Path) -> set[str]:
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
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = imported_top_levels(path) & FORBIDDEN[package]
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, f"{package}/ imports what docs/architecture.md#layers forbids: {offenders}"
