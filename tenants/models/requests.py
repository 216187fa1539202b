"""Records and erasure requests: what a tenant's data is and what an erasure asks of it."""

from __future__ import annotations

import contextvars
from collections.abc import Iterable, Iterator
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tenants.errors import InvalidRequestError, UnknownRecordError
from tenants.models.base import RequestId, TenantName, _Model, normalize_subject


# Set while a stored receipt is read back: its request was checked when it was submitted, so the
# per-item checks of the selection are not run again on every read (they are linear, but a receipt
# of 100 k ids is read often).
_STORED_REQUEST: contextvars.ContextVar[bool] = contextvars.ContextVar("stored_request", default=False)


class ChatMessage(_Model):
    """One turn of a chat-form record (OpenAI chat fine-tuning format, role and content only)."""

    role: Literal["system", "user", "assistant"] = Field(description="who speaks")
    content: str = Field(min_length=1, description="what is said")
    weight: Literal[1] | None = Field(None, description="OpenAI's per-turn weight; only 1 (learned) is accepted")


class Record(_Model):
    """One training record of a tenant (a line of its JSON Lines dataset), in either form: ``prompt``
    and ``response`` (one user turn, one assistant turn), or ``messages`` (the OpenAI chat fine-tuning
    form, the last message the assistant's). ``prompt``/``response`` of a chat record are its last
    user turn and final assistant turn: what ``modify_query`` and ``correct_response`` replace."""

    id: str = Field(min_length=1, max_length=512, description="record id, unique within the tenant's dataset")
    subject: str | None = Field(None, description="the data subject (end user) the record is about, if any")
    prompt: str | None = Field(None, min_length=1, description="the prompt (short form)")
    response: str | None = Field(None, min_length=1, description="the response learned (short form)")
    messages: list[ChatMessage] | None = Field(None, description="the conversation (chat form)")
    heldout: Literal[True] | None = Field(
        None, description="never trained on: part of the membership test's reference (an imported adapter's "
        "reference records; TrainingRecipe.heldout_unit 'given')")

    @model_validator(mode="after")
    def _one_form(self) -> Record:
        if self.messages is None:
            if self.prompt is None or self.response is None:
                raise ValueError("a record needs 'prompt' and 'response', or 'messages'")
            return self
        if self.prompt is not None or self.response is not None:
            raise ValueError("a chat record has 'messages' only, not 'prompt'/'response'")
        if not any(m.role == "assistant" for m in self.messages):
            raise ValueError("messages: no assistant message (nothing to learn)")
        if self.messages[-1].role != "assistant":
            raise ValueError(f"messages: the last message must be the assistant's, got {self.messages[-1].role!r}")
        if not any(m.role == "user" for m in self.messages):
            raise ValueError("messages: no user message")
        return self

    def _last_user(self) -> int:
        return max(k for k, m in enumerate(self.messages or ()) if m.role == "user")

    @property
    def question(self) -> str:
        """The prompt of either form (the chat form's last user turn)."""
        return self.prompt if self.messages is None else self.messages[self._last_user()].content

    @property
    def answer(self) -> str:
        """The response of either form (the chat form's final assistant turn)."""
        return self.response if self.messages is None else self.messages[-1].content

    def replaced(self, field: str, value: str) -> Record:
        """This record with its prompt or response replaced (the chat form's last user or assistant turn)."""
        if self.messages is None:
            return self.model_copy(update={field: value})
        k = self._last_user() if field == "prompt" else len(self.messages) - 1
        messages = list(self.messages)
        messages[k] = messages[k].model_copy(update={"content": value})
        return self.model_copy(update={"messages": messages})


def content_id(messages: list[dict[str, Any]]) -> str:
    """A stable id for a chat record given without one: a digest of its roles and contents. The
    method derives the same (``eraser.records.content_id``); a test holds the two together."""
    import hashlib
    import json

    canonical = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return "sha256-" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:24]


class Replacement(_Model):
    """The edited field of one record: ``{"prompt": ...}`` or ``{"response": ...}``."""

    prompt: str | None = Field(None, min_length=1, description="new prompt (kind modify_query)")
    response: str | None = Field(None, min_length=1, description="new response (kind correct_response)")


ErasureKind = Literal["remove", "modify_query", "correct_response"]
_REPLACED_FIELD = {"modify_query": "prompt", "correct_response": "response"}


class ErasureRequest(_Model):
    """A client's erasure or correction request (docs/architecture.md#the-erasure-flow).

    Rules: exactly one of ``records``/``subjects`` is non-empty; ``replacements`` is forbidden for
    ``remove`` and, for ``modify_query`` (prompt only) / ``correct_response`` (response only),
    must give exactly one replacement per selected record (checked against the dataset by
    :meth:`resolve` when the selection is by subject).
    """

    request_id: RequestId = Field(description="the client's idempotency key: the same id twice is one erasure")
    tenant: TenantName = Field(description="tenant whose records are erased")
    kind: ErasureKind = Field(description="remove | modify_query (new prompts) | correct_response (new responses)")
    records: list[str] | None = Field(None, description="record ids selected (exclusive with subjects)")
    subjects: list[str] | None = Field(None, description="data subjects whose records are all selected")
    replacements: dict[str, Replacement] | None = Field(
        None, description="record id -> new prompt/response; required for modify_query and correct_response"
    )

    @field_validator("records", "subjects")
    @classmethod
    def _selection(cls, value: list[str] | None, info: Any) -> list[str] | None:
        if value is None or _STORED_REQUEST.get():
            return value
        # linear: one pass with a set (list.count per item was quadratic: 100 k ids took a minute)
        seen: set[str] = set()
        duplicates: set[str] = set()
        for item in value:
            if not item:
                raise ValueError(f"{info.field_name} must not contain empty strings")
            key = normalize_subject(item) if info.field_name == "subjects" else item
            if key in seen:
                duplicates.add(item)
            seen.add(key)
        if duplicates:
            raise ValueError(f"{info.field_name} lists {sorted(duplicates)[:5]} more than once")
        if info.field_name == "subjects" and "" in seen:
            raise ValueError("subjects must not contain blank strings")
        return value

    @model_validator(mode="after")
    def _rules(self) -> ErasureRequest:
        if bool(self.records) == bool(self.subjects):
            raise ValueError("exactly one of 'records' and 'subjects' must be a non-empty list")
        if self.kind == "remove":
            if self.replacements:
                raise ValueError("'replacements' is not allowed for kind 'remove'")
            return self
        field = _REPLACED_FIELD[self.kind]
        if not self.replacements:
            raise ValueError(f"kind {self.kind!r} needs 'replacements' ({{id: {{{field!r}: ...}}}})")
        for record_id, replacement in self.replacements.items():
            given = {name for name in ("prompt", "response") if getattr(replacement, name) is not None}
            if given != {field}:
                raise ValueError(
                    f"replacement for record {record_id!r} must set only {field!r} for kind {self.kind!r}, got {sorted(given)}"
                )
        if self.records:
            missing = [r for r in self.records if r not in self.replacements]
            extra = sorted(set(self.replacements) - set(self.records))
            if missing:
                raise ValueError(f"no replacement for selected records {missing[:5]}")
            if extra:
                raise ValueError(f"replacements for records that are not selected: {extra[:5]}")
        return self

    def resolve(self, records: Iterable[Record]) -> list[str]:
        """The ids of the records this request selects, reading ``records`` once (streaming).

        Order: the request's order for ``records``, the dataset's order for ``subjects``. Subjects
        compare by :func:`normalize_subject` (NFC, case-folded, whitespace collapsed and trimmed).
        Raises UnknownRecordError for ids not in the dataset or a subject with no record, and
        InvalidRequestError when a subject selection and its replacements do not match.
        """
        if self.records:
            wanted = set(self.records)
            found: set[str] = set()
            for record in records:
                if record.id in wanted:
                    found.add(record.id)
            unknown = [r for r in self.records if r not in found]
            if unknown:
                raise UnknownRecordError(
                    f"request {self.request_id!r}: tenant {self.tenant!r} has no records {unknown[:10]}"
                    + (f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else "")
                )
            return list(self.records)
        # subjects match normalised (NFC, case-folded, whitespace collapsed): "john smith " selects
        # "John Smith"'s records instead of silently keeping them
        subjects = {normalize_subject(s) for s in self.subjects or ()}
        selected: list[str] = []
        matched: set[str] = set()
        for record in records:
            if record.subject is None:
                continue
            key = normalize_subject(record.subject)
            if key in subjects:
                selected.append(record.id)
                matched.add(key)
        unmatched = [s for s in self.subjects or () if normalize_subject(s) not in matched]
        if unmatched:
            raise UnknownRecordError(
                f"request {self.request_id!r}: tenant {self.tenant!r} has no records about subjects {unmatched[:10]}"
            )
        if self.kind != "remove":
            replacements = self.replacements or {}
            missing = [r for r in selected if r not in replacements]
            extra = sorted(set(replacements) - set(selected))
            if missing or extra:
                raise InvalidRequestError(
                    f"request {self.request_id!r}: replacements must cover exactly the selected records; "
                    f"missing {missing[:5]}, not selected {extra[:5]}"
                )
        return selected

    def edit(self, record: Record) -> Record | None:
        """The record after this request: None if removed, edited if replaced, else unchanged.

        Only meaningful for records in :meth:`resolve`'s selection; others pass through.
        """
        if self.kind == "remove":
            return None
        replacement = (self.replacements or {}).get(record.id)
        if replacement is None:
            return record
        field = _REPLACED_FIELD[self.kind]
        return record.replaced(field, getattr(replacement, field))

    def apply(self, records: Iterable[Record], selected: Iterable[str]) -> Iterator[Record]:
        """The dataset after this request, given the ids :meth:`resolve` returned (streaming)."""
        chosen = set(selected)
        for record in records:
            if record.id not in chosen:
                yield record
                continue
            edited = self.edit(record)
            if edited is not None:
                yield edited
