"""The repository's docs point only at what the repository holds.

- every relative link in a Markdown file (``docs/*.md``, ``README.md``, ...) names a file or folder
  that exists, and a ``#section`` a heading of that page;
- every ``docs/...`` path mentioned in code, configs or Markdown exists (with its ``#section``);
- no file cites the outside design documents any more (their content lives in ``docs/``).

Reads files only: no network, no imports of the packages; well under a second.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = (".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".cfg", ".txt", "Makefile", "Dockerfile")
# Folders that are not the project's own text: hidden ones (.git, .venv, .cache, ...) and build outputs.
SKIPPED_DIRS = {"__pycache__", "node_modules", "build", "dist", "demo-run", "runs", "work"}
# The two outside documents the code once cited, spelled so that this file does not cite them itself.
OUTSIDE_DOCS = ("DESIGN" + ".md", "STACK" + ".md")

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
DOCS_MENTION = re.compile(r"(?<![\w./-])docs/[\w./-]*(?:#[\w-]+)?")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def project_files() -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
        for name in files:
            if name.endswith(SCANNED):
                found.append(Path(folder, name))
    return sorted(found)


def markdown_files() -> list[Path]:
    return [p for p in project_files() if p.suffix == ".md"]


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    slugs, seen = set(), {}
    for heading in HEADING.findall(text):
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        slugs.add(slug if count == 0 else f"{slug}-{count}")
    return frozenset(slugs)


def problem(target: str, base: Path) -> str | None:
    """Why ``target`` (a path relative to ``base``, maybe with ``#anchor``) does not resolve, or None."""
    path_part, _, anchor = target.partition("#")
    path = (base / path_part).resolve() if path_part else None
    if path is not None:
        if ROOT not in path.parents and path != ROOT:
            return "points outside the repository"
        if not path.exists():
            return "no such file or folder"
    if anchor:
        page = path
        if page is None or page.suffix != ".md" or not page.is_file():
            return None if page is not None else "an anchor with no page"
        if anchor.lower() not in anchors(page):
            return f"no section #{anchor} in {page.relative_to(ROOT)}"
    return None


def relative_links(path: Path) -> list[str]:
    text = INLINE_CODE.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]


def test_relative_links_in_markdown_resolve():
    files = markdown_files()
    assert any(p.relative_to(ROOT).as_posix() == "docs/README.md" for p in files), "docs/README.md is missing"
    broken = []
    for path in files:
        for target in relative_links(path):
            why = problem(target if not target.startswith("#") else path.name + target, path.parent)
            if why:
                broken.append(f"{path.relative_to(ROOT)}: ({target}) {why}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_docs_paths_mentioned_anywhere_exist():
    broken = []
    for path in project_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for mention in DOCS_MENTION.findall(text):
            target = mention.rstrip(".,;:")
            why = problem(target, ROOT)
            if why:
                broken.append(f"{path.relative_to(ROOT)}: {target} {why}")
    assert not broken, "docs/ mentions that do not resolve:\n" + "\n".join(broken)


@pytest.mark.parametrize("name", OUTSIDE_DOCS)
def test_no_file_cites_the_outside_design_documents(name):
    citing = []
    for path in project_files():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if name in line:
                citing.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not citing, f"{name} is not in the repository; point into docs/ instead:\n" + "\n".join(citing)


def test_the_slug_rule_matches_githubs():
    assert github_slug("Ray cluster on AWS: `ray_cluster.yaml`") == "ray-cluster-on-aws-ray_clusteryaml"
    assert github_slug("Records, rendering and the loss") == "records-rendering-and-the-loss"
    assert github_slug("S3 settings (`tenants/settings.py`)") == "s3-settings-tenantssettingspy"
