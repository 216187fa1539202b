"""Everything persisted or sent across Ray/HTTP: records, requests, receipts, configs, manifests.

Pydantic v2 models, ``extra="forbid"``, one description per field. JSON round-trips exactly
(``model_dump_json`` / ``model_validate_json``); timestamps are timezone-aware UTC.
"""

from __future__ import annotations

import contextvars
import enum
import unicodedata
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from tenants.errors import InvalidRequestError, InvalidTransitionError, UnknownRecordError
from tenants.paths import (
    validate_adapter_version,
    validate_data_version,
    validate_request_id,
    validate_tenant_name,
)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def producer_version() -> str:
    """``llm-eraser-service <version>``: stamped on every artifact the store writes."""
    try:
        from importlib.metadata import version

        return f"llm-eraser-service {version('llm-eraser-service')}"
    except Exception:  # not installed (source checkout): still say who wrote it
        return "llm-eraser-service unknown"


class _Model(BaseModel):
    # allow_inf_nan=False: ``lr: Infinity`` (Python's json accepts it) is refused, not trained with
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def normalize_subject(subject: str) -> str:
    """The form subjects are compared in: NFC, case-folded, whitespace runs as one space, trimmed.

    "John Smith", "john smith", "John  Smith " and an NFD "Jos\u0065\u0301" all select the same records.
    """
    folded = unicodedata.normalize("NFC", subject).casefold()
    return unicodedata.normalize("NFC", " ".join(folded.split()))


# Set while a stored receipt is read back: its request was checked when it was submitted, so the
# per-item checks of the selection are not run again on every read (they are linear, but a receipt
# of 100 k ids is read often).
_STORED_REQUEST: contextvars.ContextVar[bool] = contextvars.ContextVar("stored_request", default=False)


# ---------------------------------------------------------------- records and requests


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

    request_id: str = Field(description="the client's idempotency key: the same id twice is one erasure")
    tenant: str = Field(description="tenant whose records are erased")
    kind: ErasureKind = Field(description="remove | modify_query (new prompts) | correct_response (new responses)")
    records: list[str] | None = Field(None, description="record ids selected (exclusive with subjects)")
    subjects: list[str] | None = Field(None, description="data subjects whose records are all selected")
    replacements: dict[str, Replacement] | None = Field(
        None, description="record id -> new prompt/response; required for modify_query and correct_response"
    )

    @field_validator("request_id")
    @classmethod
    def _request_id(cls, value: str) -> str:
        return validate_request_id(value)

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, value: str) -> str:
        return validate_tenant_name(value)

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


# ---------------------------------------------------------------- receipts


class ReceiptStatus(str, enum.Enum):
    """Where an erasure request stands. Terminal: published, rejected."""

    pending = "pending"
    running = "running"
    published = "published"
    failed = "failed"
    rejected = "rejected"


# pending -> running -> published | failed | rejected; running -> pending re-queues a request
# whose coordinator died; failed -> pending retries it (an operator's decision).
ALLOWED_TRANSITIONS: dict[ReceiptStatus, frozenset[ReceiptStatus]] = {
    ReceiptStatus.pending: frozenset({ReceiptStatus.running, ReceiptStatus.rejected, ReceiptStatus.failed}),
    ReceiptStatus.running: frozenset(
        {ReceiptStatus.published, ReceiptStatus.failed, ReceiptStatus.rejected, ReceiptStatus.pending}
    ),
    ReceiptStatus.failed: frozenset({ReceiptStatus.pending}),
    ReceiptStatus.published: frozenset(),
    ReceiptStatus.rejected: frozenset(),
}
_STATUS_TIMESTAMP = {
    ReceiptStatus.running: "started_at",
    ReceiptStatus.published: "published_at",
    ReceiptStatus.failed: "failed_at",
    ReceiptStatus.rejected: "rejected_at",
}

ErasurePath = Literal["influence", "influence+remediation", "retrain"]


class PurgeEntry(_Model):
    """One superseded version deleted by purge."""

    kind: Literal["adapter", "data", "adapter-partial", "data-partial"] = Field(
        description="what was deleted; '-partial' = an upload that never committed"
    )
    version: str = Field(description="the version deleted, e.g. v000003 or d000003")
    key: str = Field(description="the S3 key prefix that was deleted")
    objects: int = Field(0, ge=0, description="number of objects deleted under that prefix")
    request_ids: list[str] = Field(default_factory=list, description="published erasures whose records it held")
    deleted_at: datetime = Field(description="when it was deleted (UTC)")


class Receipt(_Model):
    """The ledger entry of one erasure request: the request, its status and the evidence."""

    request: ErasureRequest = Field(description="the request as submitted")

    @field_validator("request", mode="wrap")
    @classmethod
    def _stored_request(cls, value: Any, handler: Any) -> ErasureRequest:
        if isinstance(value, ErasureRequest):
            return handler(value)
        token = _STORED_REQUEST.set(True)
        try:
            return handler(value)
        finally:
            _STORED_REQUEST.reset(token)
    status: ReceiptStatus = Field(ReceiptStatus.pending, description="pending|running|published|failed|rejected")
    created_at: datetime = Field(default_factory=utcnow, description="when the request was recorded")
    updated_at: datetime = Field(default_factory=utcnow, description="last change of this receipt")
    started_at: datetime | None = Field(None, description="when it entered 'running'")
    published_at: datetime | None = Field(None, description="when its adapter went live (HEAD moved)")
    failed_at: datetime | None = Field(None, description="when it entered 'failed'")
    rejected_at: datetime | None = Field(None, description="when it entered 'rejected'")
    old_adapter_version: str | None = Field(None, description="HEAD's adapter before the erasure")
    new_adapter_version: str | None = Field(None, description="adapter version published by the erasure")
    old_data_version: str | None = Field(None, description="HEAD's data version before the erasure")
    new_data_version: str | None = Field(None, description="data version without the erased records")
    records_affected: list[str] = Field(default_factory=list, description="ids of the records removed or edited")
    solver: dict[str, Any] = Field(default_factory=dict, description="solver report (iterations, residual, damping, wall time)")
    checks: dict[str, Any] = Field(default_factory=dict, description="fidelity checks (losses before/after, membership test)")
    path: ErasurePath | None = Field(None, description="what produced the adapter: influence | influence+remediation | retrain")
    stages: dict[str, float] = Field(default_factory=dict, description="seconds spent per stage")
    purged: list[PurgeEntry] = Field(default_factory=list, description="superseded versions deleted and when")
    replicas_switched_at: datetime | None = Field(None, description="when every serving replica dropped the old adapter")
    error: str | None = Field(None, description="why it failed or was rejected")
    redacted_at: datetime | None = Field(
        None, description="when subject names, record ids, replacement text and the error were replaced by "
        "digests (retention: StoreSettings.receipt_redact_after_seconds after the request ended)")
    lease_token: int | None = Field(
        None, description="fencing token of the coordinator lease under which the receipt last changed")
    attempts: list[dict[str, Any]] = Field(
        default_factory=list, description="failed attempts retried by the reconciler: {at, error, retry_at}")

    _etag: str | None = PrivateAttr(None)

    @property
    def tenant(self) -> str:
        return self.request.tenant

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def terminal(self) -> bool:
        return not ALLOWED_TRANSITIONS[self.status]

    def transition(self, new_status: ReceiptStatus | str, **fields: Any) -> Receipt:
        """Move to ``new_status`` (InvalidTransitionError if not allowed), set ``fields``, stamp times.

        Mutates and returns ``self``.
        """
        new_status = ReceiptStatus(new_status)
        if new_status not in ALLOWED_TRANSITIONS[self.status]:
            raise InvalidTransitionError(
                f"request {self.request_id!r} of tenant {self.tenant!r}: cannot go from "
                f"{self.status.value!r} to {new_status.value!r}"
            )
        now = utcnow()
        self.update(**fields)
        self.status = new_status
        stamp = _STATUS_TIMESTAMP.get(new_status)
        if stamp and stamp not in fields:
            setattr(self, stamp, now)
        self.updated_at = now
        return self

    def update(self, **fields: Any) -> Receipt:
        """Set fields (validated) without changing the status; stamps ``updated_at``. Returns ``self``."""
        for name in ("status", "request", "created_at"):
            if name in fields:
                raise InvalidTransitionError(f"receipt field {name!r} cannot be set by update()")
        for name, value in fields.items():
            if name not in type(self).model_fields:
                raise InvalidTransitionError(f"receipt has no field {name!r}")
            setattr(self, name, value)
        self.updated_at = utcnow()
        return self


# ---------------------------------------------------------------- tenant configuration


DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraRecipe(_Model):
    """The LoRA shape of a tenant's adapter."""

    rank: int = Field(8, ge=1, le=1024, description="LoRA rank r")
    alpha: float = Field(16, gt=0, description="LoRA alpha (scale = alpha / rank)")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout during training (off for HVPs)")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES), min_length=1, description="module names LoRA wraps"
    )
    use_rslora: bool = Field(False, description="rank-stabilised scaling alpha / sqrt(rank) (an imported adapter's "
                             "own; the service's retrain builds plain LoRA, so it cannot retrain such an adapter)")


class TrainingRecipe(_Model):
    """How a tenant's adapter is trained (onboarding and the exact-retrain fallback)."""

    epochs: int = Field(3, ge=1, description="passes over the training split")
    lr: float = Field(2e-4, gt=0, description="learning rate")
    batch_size: int = Field(8, ge=1, description="records per optimiser step")
    seed: int = Field(0, description="seed for shuffling, the held-out split and initialisation")
    heldout_fraction: float = Field(
        0.1, ge=0, lt=1, description="share of records never trained on (membership-test reference)"
    )
    heldout_unit: Literal["mixed", "record", "given"] = Field(
        "mixed", description="mixed: half the held-out share is whole subjects (the reference for erasing a "
        "subject), half single records of the others (for erasing single records); record: every record by "
        "itself (tenants onboarded before subjects were held out whole); given: the records flagged 'heldout' "
        "(an imported adapter's reference; heldout_fraction is not used)")
    max_length: int = Field(512, ge=8, description="token limit of a rendered record (longer ones lose their "
                            "oldest tokens); training, the method, verification and the retrain all cut there")
    chat_template: str | None = Field(
        None, min_length=1, description="Jinja chat template records are rendered with; None: the base "
        "tokenizer's own (the built-in 'Question: ... Answer:' format for a base without one)")
    reproducible: bool = Field(
        True, description="False: the adapter was imported without the recipe that trained it; no exact-retrain "
        "fallback (an erasure the influence update and remediation cannot make pass fails instead)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the tenant's jobs compute: auto (the GPU a worker was given, else the CPU), "
        "cpu, or cuda (a job on a worker without a GPU fails)")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="precision of the base model's weights in the tenant's jobs; LoRA factors, "
        "gradients, the curvature and solver vectors stay float32")
    curvature_budget_mib: float | None = Field(
        None, gt=0, description="memory for the adapter's cached curvature and for building it, MiB (its rank "
        "and samples are cut to fit); None: the service's (SolveConfig.cache_budget_mib, 2048)")


class KeyHash(_Model):
    """A tenant API key as stored: a salted scrypt hash, never the key."""

    key_id: str = Field(description="public identifier embedded in the key (selects this hash)")
    salt: str = Field(description="random salt, hex")
    hash: str = Field(description="scrypt(key, salt), hex")
    algorithm: Literal["scrypt"] = Field("scrypt", description="key derivation function")
    n: int = Field(2**14, description="scrypt cost parameter N")
    r: int = Field(8, description="scrypt block size r")
    p: int = Field(1, description="scrypt parallelism p")
    label: str | None = Field(None, description="free-form note (who or what uses the key)")
    created_at: datetime = Field(default_factory=utcnow, description="when it was issued")


class TenantConfig(_Model):
    """``tenant.json``: the base model, LoRA and training recipe, and API key hashes of a tenant."""

    name: str = Field(description="tenant name (lowercase letters, digits, '-')")
    base_model: str = Field(min_length=1, description="model name under models/, an s3:// URI or a local path")
    lora: LoraRecipe = Field(default_factory=LoraRecipe, description="LoRA shape")
    training: TrainingRecipe = Field(default_factory=TrainingRecipe, description="training recipe")
    key_hashes: list[KeyHash] = Field(default_factory=list, description="hashes of the tenant's API keys")
    created_at: datetime = Field(default_factory=utcnow, description="when the tenant was created")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_tenant_name(value)

    def retrain_unavailable(self) -> str | None:
        """Why the exact-retrain fallback cannot run for this tenant, for receipts and manifests; None: it can."""
        if not self.training.reproducible:
            return "unavailable: imported without a training recipe"
        if self.lora.use_rslora:
            return "unavailable: the adapter uses rsLoRA scaling, which the service's retrain does not build"
        return None

    def public(self) -> dict[str, Any]:
        """The config without key hashes (for display)."""
        data = self.model_dump(mode="json", exclude={"key_hashes"})
        data["keys"] = [
            {"key_id": k.key_id, "label": k.label, "created_at": k.created_at.isoformat()} for k in self.key_hashes
        ]
        return data


# ---------------------------------------------------------------- versions


class Head(_Model):
    """``HEAD.json``: the live adapter and data version of a tenant."""

    adapter: str = Field(description="live adapter version")
    data: str = Field(description="live data version (the records the adapter reflects)")
    updated_at: datetime | None = Field(None, description="when HEAD was moved (makes every HEAD.json distinct)")
    lease_token: int | None = Field(None, description="fencing token of the coordinator lease that moved HEAD")

    @field_validator("adapter")
    @classmethod
    def _adapter(cls, value: str) -> str:
        return validate_adapter_version(value)

    @field_validator("data")
    @classmethod
    def _data(cls, value: str) -> str:
        return validate_data_version(value)


class AdapterManifest(_Model):
    """``eraser.json`` of an adapter version: what it is, where it came from, how it was checked.

    The store fills ``version``, ``tenant``, ``files``, ``sha256``, ``created_at`` and ``producer``
    on publish; the caller supplies the lineage and evidence.
    """

    version: str | None = Field(None, description="adapter version (allocated by the store on publish)")
    parent_version: str | None = Field(None, description="adapter version it was derived from")
    data_version: str | None = Field(None, description="data version it reflects")
    tenant: str | None = Field(None, description="owning tenant (set by the store)")
    base_model: str | None = Field(None, description="base model it applies to")
    sha256: str | None = Field(None, description="sha256 of adapter_model.safetensors")
    files: dict[str, str] = Field(default_factory=dict, description="file name -> sha256 of every file but eraser.json")
    request_ids: list[str] = Field(default_factory=list, description="erasure requests applied to produce it")
    solver: dict[str, Any] | None = Field(None, description="solver report")
    checks: dict[str, Any] | None = Field(None, description="fidelity checks")
    path: ErasurePath | Literal["train", "import"] | None = Field(
        None, description="how it was produced: train | import (an existing adapter brought in, see "
        "arguments.imported) | influence | influence+remediation | retrain"
    )
    arguments: dict[str, Any] | None = Field(None, description="method arguments used to produce it")
    created_at: datetime = Field(default_factory=utcnow, description="when it was published")
    producer: str = Field(default_factory=producer_version, description="package and version that wrote it")


class ShardInfo(_Model):
    """One gzip JSON Lines shard of a data version."""

    name: str = Field(description="file name, e.g. part-00000.jsonl.gz")
    records: int = Field(ge=0, description="records in the shard")
    sha256: str = Field(description="sha256 of the compressed shard")
    bytes: int = Field(ge=0, description="compressed size")


class DataManifest(_Model):
    """``dataset.json`` of a data version: its completion marker, written last."""

    version: str = Field(description="data version")
    tenant: str = Field(description="owning tenant")
    parent: str | None = Field(None, description="data version it was derived from")
    request_ids: list[str] = Field(default_factory=list, description="erasure requests applied to produce it")
    records: int = Field(ge=0, description="total number of records")
    shards: list[ShardInfo] = Field(default_factory=list, description="shards in order")
    created_at: datetime = Field(default_factory=utcnow, description="when it was committed")
    producer: str = Field(default_factory=producer_version, description="package and version that wrote it")


class ModelManifest(_Model):
    """``eraser-model.json`` of a base model upload: its completion marker, written last."""

    name: str = Field(description="model name under models/")
    files: dict[str, str] = Field(description="relative file name -> sha256")
    created_at: datetime = Field(default_factory=utcnow, description="when it was uploaded")
    producer: str = Field(default_factory=producer_version, description="package and version that wrote it")
