"""The reference population of the membership test: records the adapter never trained on.

Three decisions live here, each a pure function of record ids and subjects (every layer, the
onboarding, the coordinator, the CLI, a Ray worker, computes the same answer):

1. **The held-out split** (:func:`split_heldout`), fixed at onboarding. What an erased record must
   look like after a retrain depends on what it was: erasing *every* record of a subject (a GDPR
   request about a person) leaves a retrain that never saw the subject, so its records must look like
   records of subjects the adapter never saw; erasing *single* records of a subject that stays
   leaves a retrain that still knows the subject from its other records, so they must look like
   held-out records of trained subjects. The ``mixed`` unit (default) therefore holds out both kinds:
   whole subjects with probability ``fraction / 2`` and, of the other subjects, single records with
   probability ``fraction / 2``. (``record``: every record by itself, the split of tenants onboarded
   before subjects were held out whole; erasing a subject is then judged against records of
   subjects the adapter trained on, which a retrain without them does not match: issue 12 measured
   the exact retrain rejected that way.)
2. **Which reference an erased record is judged against** (:func:`reference_pools`): records of
   unseen subjects for a subject no longer trained on, held-out records of trained subjects otherwise.
3. **Steering and deciding halves** (:func:`steering_split`): the records that choose the damping and
   steer remediation are not the records that decide publication, so a pass is not chosen by noise
   on the records that then judge it. Split by subject (records of one subject are correlated), so
   neither half knows the other's subjects.
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterable, Literal, Sequence

from eraser.errors import EraserError, InvalidRecordsError
from eraser.records import Record

HELDOUT_UNITS: tuple[str, ...] = ("mixed", "record")
HeldoutUnit = Literal["mixed", "record"]


def heldout_score(key: str, seed: int = 0) -> float:
    """A uniform number in [0, 1) fixed by ``key`` and the seed (sha256): the split's coin."""
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_heldout(record: Record, fraction: float, seed: int = 0, unit: HeldoutUnit = "mixed") -> bool:
    """Whether ``record`` is in the held-out split (see the module docstring)."""
    if unit == "record" or record.subject is None:
        return heldout_score(record.id, seed) < fraction
    if heldout_score(f"subject:{record.subject}", seed) < fraction / 2:
        return True
    return heldout_score(record.id, seed) < fraction / 2


def split_heldout(records: Sequence[Record], fraction: float, seed: int = 0,
                  unit: HeldoutUnit = "mixed") -> tuple[list[Record], list[Record]]:
    """``(train, heldout)``, deterministic per record id and subject (not per position): adding records
    never moves an existing one across the split, and a corrected record keeps its side. ``fraction ==
    0`` holds out nothing."""
    if not 0 <= fraction < 1:
        raise EraserError(f"heldout fraction must be in [0, 1), got {fraction!r}")
    if unit not in HELDOUT_UNITS:
        raise EraserError(f"heldout unit must be one of {HELDOUT_UNITS}, got {unit!r}")
    train, heldout = [], []
    for record in records:
        (heldout if is_heldout(record, fraction, seed, unit) else train).append(record)
    return train, heldout


def evenly_spaced(records: Sequence[Record], limit: int) -> list[Record]:
    """At most ``limit`` records, evenly spaced (a reference lists a subject's records together, so this
    spreads a sample over the subjects)."""
    return list(records)[:: max(1, math.ceil(len(records) / limit))]


def subject_key(record: Record) -> str:
    """The unit records are correlated by: the subject, or the record itself when it has none."""
    return f"subject:{record.subject}" if record.subject is not None else f"record:{record.id}"


def steering_split(reference: Sequence[Record], seed: int = 0) -> tuple[list[Record], list[Record]]:
    """``(steering, deciding)``: the reference's subjects ranked by a seeded hash and dealt alternately,
    so both halves get about half the subjects (and never share one) however few there are."""
    keys = sorted({subject_key(r) for r in reference}, key=lambda k: heldout_score(f"steer:{k}", seed))
    steering_keys = set(keys[0::2])
    steering = [r for r in reference if subject_key(r) in steering_keys]
    deciding = [r for r in reference if subject_key(r) not in steering_keys]
    return steering, deciding


def reference_pools(reference: Sequence[Record], trained_subjects: Iterable[str]) -> dict[str, list[Record]]:
    """The reference split by what it stands for: ``unseen`` (records of subjects the adapter does not
    train on) and ``seen`` (held-out records of subjects it trains on, and records without a subject)."""
    trained = set(trained_subjects)
    pools: dict[str, list[Record]] = {"unseen": [], "seen": []}
    for record in reference:
        unseen = record.subject is not None and record.subject not in trained
        pools["unseen" if unseen else "seen"].append(record)
    return pools


def member_pool(record: Record, trained_subjects: set[str]) -> str:
    """Which pool an erased record is judged against: ``unseen`` when no training record of its subject
    remains (the retrain never saw the subject), else ``seen``."""
    return "unseen" if record.subject is not None and record.subject not in trained_subjects else "seen"


def check_disjoint(records: Sequence[Record], reference: Sequence[Record]) -> None:
    """Refuse a reference that shares a record (same id, or the same conversation) with the training
    records: a record the adapter trained on cannot stand for records it never saw."""
    if not reference:
        raise InvalidRecordsError("the reference set is empty: the membership test needs records never trained on")
    ids = {r.id for r in records}
    contents = {conversation(r): r.id for r in records}
    for record in reference:
        if record.id in ids:
            raise InvalidRecordsError(f"reference record {record.id!r} has the id of a training record")
        twin = contents.get(conversation(record))
        if twin is not None:
            raise InvalidRecordsError(f"reference record {record.id!r} is training record {twin!r} again")


def conversation(record: Record) -> tuple[tuple[str, str], ...]:
    """What a record says, whatever its form or id: its (role, content) turns."""
    return tuple((m["role"], m["content"]) for m in record.messages())
