"""Erasure requests as edits of the training set: ``z_i -> z'_i`` (``z'_i`` absent for ``remove``).

The three kinds of LLMEraser (instance removal, query modification, response correction) and any
mixture of them reduce to a list of :class:`Edit`; ``b`` and the retrained "gold" both come from it.
This module validates the request against the records; the JSON/HTTP schema lives in ``tenants``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from eraser.errors import EmptySelectionError, InvalidRequestError, UnknownRecordError
from eraser.records import Record

KINDS: tuple[str, ...] = ("remove", "modify_query", "correct_response")
_REPLACED_FIELD = {"modify_query": "prompt", "correct_response": "response"}


@dataclass(frozen=True)
class Edit:
    """One record's change: ``old`` is in the training set; ``new`` replaces it (None: removed)."""

    old: Record
    new: Record | None
    kind: str


@dataclass(frozen=True)
class EditRequest:
    """The method's view of one erasure request (see docs/method.md#the-influence-estimate)."""

    kind: str
    records: tuple[str, ...] = ()
    subjects: tuple[str, ...] = ()
    replacements: Mapping[str, Mapping[str, str]] | None = None
    request_id: str = ""

    @classmethod
    def from_json(cls, obj: Mapping) -> "EditRequest":
        if not isinstance(obj, Mapping):
            raise InvalidRequestError("request must be a JSON object")
        unknown = set(obj) - {"request_id", "tenant", "kind", "records", "subjects", "replacements"}
        if unknown:
            raise InvalidRequestError(f"request has unknown field(s) {sorted(unknown)}")
        return cls(
            kind=obj.get("kind", ""),
            records=tuple(obj.get("records") or ()),
            subjects=tuple(obj.get("subjects") or ()),
            replacements=obj.get("replacements"),
            request_id=str(obj.get("request_id", "")),
        )


def select(request: EditRequest, records: Sequence[Record]) -> list[Record]:
    """The records a request selects, in training-set order. Raises on unknown ids or none selected."""
    if request.kind not in KINDS:
        raise InvalidRequestError(f"kind must be one of {KINDS}, got {request.kind!r}")
    if bool(request.records) == bool(request.subjects):
        raise InvalidRequestError("give exactly one of 'records' (ids) or 'subjects', non-empty")
    if request.records:
        known = {r.id for r in records}
        missing = [i for i in request.records if i not in known]
        if missing:
            raise UnknownRecordError(f"unknown record id(s): {missing[:10]}")
        wanted = set(request.records)
        chosen = [r for r in records if r.id in wanted]
    else:
        subjects = set(request.subjects)
        found = {r.subject for r in records if r.subject in subjects}
        missing = sorted(subjects - found)
        if missing:
            raise UnknownRecordError(f"no records about subject(s): {missing[:10]}")
        chosen = [r for r in records if r.subject in subjects]
    if not chosen:
        raise EmptySelectionError("the request selects no record")
    return chosen


def build_edits(request: EditRequest, records: Sequence[Record]) -> list[Edit]:
    chosen = select(request, records)
    replacements = dict(request.replacements or {})
    if request.kind == "remove":
        if replacements:
            raise InvalidRequestError("'replacements' are not allowed for kind 'remove'")
        return [Edit(old=r, new=None, kind="remove") for r in chosen]
    field = _REPLACED_FIELD[request.kind]
    chosen_ids = {r.id for r in chosen}
    stray = sorted(set(replacements) - chosen_ids)
    if stray:
        raise InvalidRequestError(f"replacements for records the request does not select: {stray[:10]}")
    edits = []
    for record in chosen:
        replacement = replacements.get(record.id)
        if not replacement or set(replacement) != {field} or not isinstance(replacement[field], str) or not replacement[field]:
            raise InvalidRequestError(
                f"kind {request.kind!r} needs replacements[{record.id!r}] = {{{field!r}: non-empty string}}, "
                f"got {replacement!r}"
            )
        new = record.with_prompt(replacement[field]) if field == "prompt" else record.with_response(replacement[field])
        edits.append(Edit(old=record, new=new, kind=request.kind))
    return edits


def merge_edits(requests: Iterable[EditRequest], records: Sequence[Record]) -> list[Edit]:
    """Edits of several requests applied together (a mixture); one record may be edited once only."""
    edits: list[Edit] = []
    seen: dict[str, str] = {}
    for request in requests:
        for edit in build_edits(request, records):
            if edit.old.id in seen:
                raise InvalidRequestError(
                    f"record {edit.old.id!r} is edited by two requests ({seen[edit.old.id]!r}, {request.request_id!r})"
                )
            seen[edit.old.id] = request.request_id
            edits.append(edit)
    return edits


def apply_edits(records: Sequence[Record], edits: Sequence[Edit]) -> list[Record]:
    """The training set after the edits: what retraining from scratch would train on."""
    by_id = {edit.old.id: edit for edit in edits}
    result = []
    for record in records:
        edit = by_id.get(record.id)
        if edit is None:
            result.append(record)
        elif edit.new is not None:
            result.append(edit.new)
    return result


def restrict_requests(requests: Sequence[EditRequest], records: Sequence[Record],
                      heldout: Sequence[Record]) -> tuple[list[EditRequest], list[str]]:
    """Validate ``requests`` against all the tenant's records (training + held-out); return them
    restricted to the training records (as id lists), and the held-out ids they name."""
    merge_edits(requests, [*records, *heldout])  # raises on unknown ids/subjects, bad replacements
    heldout_ids = {r.id for r in heldout}
    restricted, touched = [], []
    for request in requests:
        edits = merge_edits([request], [*records, *heldout])
        touched += [e.old.id for e in edits if e.old.id in heldout_ids]
        ids = tuple(e.old.id for e in edits if e.old.id not in heldout_ids)
        if not ids:
            continue
        replacements = ({i: request.replacements[i] for i in ids if i in request.replacements}
                        if request.replacements else None)
        restricted.append(EditRequest(kind=request.kind, records=ids, replacements=replacements,
                                      request_id=request.request_id))
    return restricted, touched
