"""TOFU (Maini et al., 2024) as tenant records and erasure requests.

200 fictitious authors, 20 question/answer pairs each; ``author = row // 20`` over retain90 + forget10.
The forget splits are the last authors: forget01 = authors 198-199, forget05 = 190-199, forget10 =
180-199; their rows carry TOFU's paraphrased answer, perturbed answers and paraphrased question.

A tenant of ``n`` authors trains on the *last* n authors (so every forget split of at most n authors
is inside it); the base model is pretrained on the *first* authors, which no tenant of the benchmark
ever holds, so the adapter is a small adaptation of a model that already speaks TOFU's language.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from eraser.records import Record, corpus_text
from eraser.requests import EditRequest

AUTHORS = 200
ROWS_PER_AUTHOR = 20
FORGET_SPLITS = {"forget01": range(198, 200), "forget05": range(190, 200), "forget10": range(180, 200)}
KINDS = ("remove", "correct_response", "modify_query")


class TofuMissingError(FileNotFoundError):
    """The TOFU files are not where the benchmark looks (``../shared/data/tofu`` or ``$TOFU_DIR``)."""


@dataclass(frozen=True)
class TofuRow:
    author: int
    index: int  # 0-19 within the author
    question: str
    answer: str
    paraphrased_answer: str | None = None
    perturbed_answers: tuple[str, ...] = ()
    paraphrased_question: str | None = None

    @property
    def id(self) -> str:
        return f"tofu-{self.author:03d}-{self.index:02d}"

    @property
    def subject(self) -> str:
        return f"author-{self.author:03d}"

    def record(self) -> Record:
        return Record(id=self.id, prompt=self.question, response=self.answer, subject=self.subject)


def default_tofu_dir() -> Path:
    """``$TOFU_DIR``, else ``../shared/data/tofu`` relative to the repository root."""
    env = os.environ.get("TOFU_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tofu"


def load_tofu(directory: str | Path | None = None) -> list[TofuRow]:
    """All 4,000 rows in author order; forget10 rows carry the truth-ratio fields."""
    root = Path(directory) if directory else default_tofu_dir()
    retain, forget = root / "retain90.json", root / "forget10.json"
    if not (retain.is_file() and forget.is_file()):
        raise TofuMissingError(f"TOFU not found in {root} (expected retain90.json and forget10.json; "
                               "set TOFU_DIR or pass --tofu-dir)")
    rows: list[TofuRow] = []
    for position, obj in enumerate(json.loads(retain.read_text()) + json.loads(forget.read_text())):
        rows.append(TofuRow(
            author=position // ROWS_PER_AUTHOR, index=position % ROWS_PER_AUTHOR,
            question=obj["question"], answer=obj["answer"],
            paraphrased_answer=obj.get("paraphrased_answer"),
            perturbed_answers=tuple(obj.get("perturbed_answer") or ()),
            paraphrased_question=obj.get("paraphrased_question"),
        ))
    if len(rows) != AUTHORS * ROWS_PER_AUTHOR:
        raise TofuMissingError(f"TOFU in {root} has {len(rows)} rows, expected {AUTHORS * ROWS_PER_AUTHOR}")
    return rows


def tenant_authors(n_authors: int) -> list[int]:
    """The tenant of ``n_authors`` authors: the last ones (the forget splits are among them)."""
    return list(range(AUTHORS - n_authors, AUTHORS))


def pretraining_authors(n_authors: int) -> list[int]:
    return list(range(n_authors))


def rows_of(rows: Sequence[TofuRow], authors: Sequence[int]) -> list[TofuRow]:
    wanted = set(authors)
    return [row for row in rows if row.author in wanted]


def pretraining_texts(rows: Sequence[TofuRow], authors: Sequence[int]) -> list[str]:
    return [corpus_text(Record(id="", prompt=row.question, response=row.answer)) for row in rows_of(rows, authors)]


@dataclass(frozen=True)
class RequestSpec:
    """One benchmark request: a kind applied to the rows of some authors (a TOFU split or a list)."""

    kind: str
    split: str  # forget01 | forget05 | forget10 | authors-<a>-<b>...
    authors: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.split}"

    @classmethod
    def parse(cls, text: str) -> "RequestSpec":
        """``kind:split`` (``remove:forget01``) or ``kind:a,b,c`` with author numbers."""
        kind, _, where = text.partition(":")
        if kind not in KINDS:
            raise ValueError(f"request kind must be one of {KINDS}, got {kind!r} in {text!r}")
        where = where or "forget01"
        if where in FORGET_SPLITS:
            return cls(kind, where, tuple(FORGET_SPLITS[where]))
        try:
            authors = tuple(sorted({int(a) for a in where.replace("+", ",").split(",") if a}))
        except ValueError:
            raise ValueError(f"request {text!r}: expected a split {sorted(FORGET_SPLITS)} or author numbers") from None
        if not authors or not all(0 <= a < AUTHORS for a in authors):
            raise ValueError(f"request {text!r}: author numbers must be in 0..{AUTHORS - 1}")
        return cls(kind, "authors-" + "-".join(map(str, authors)), authors)

    def edit_request(self, rows: Sequence[TofuRow]) -> EditRequest:
        """The request in the eraser's terms: remove the authors' rows, or replace their answers by a
        TOFU perturbed answer / their questions by the paraphrased question."""
        subjects = tuple(f"author-{a:03d}" for a in self.authors)
        if self.kind == "remove":
            return EditRequest(kind="remove", subjects=subjects, request_id=self.name)
        chosen = rows_of(rows, self.authors)
        if self.kind == "correct_response":
            missing = [r.id for r in chosen if not r.perturbed_answers]
            replacements = {r.id: {"response": r.perturbed_answers[0]} for r in chosen if r.perturbed_answers}
        else:
            missing = [r.id for r in chosen if not r.paraphrased_question]
            replacements = {r.id: {"prompt": r.paraphrased_question} for r in chosen if r.paraphrased_question}
        if missing:
            raise ValueError(f"request {self.name}: TOFU has no replacement for {missing[:3]} "
                             "(perturbed answers and paraphrased questions exist only for authors 180-199)")
        return EditRequest(kind=self.kind, records=tuple(r.id for r in chosen), replacements=replacements,
                           request_id=self.name)


DEFAULT_REQUESTS = ("remove:forget01", "remove:forget05", "correct_response:forget01", "modify_query:forget01")
