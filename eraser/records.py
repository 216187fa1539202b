"""Training records, their two JSON forms, batching and THE loss.

A record is a conversation: the OpenAI chat fine-tuning form (``messages``: system, user and
assistant turns) or the short form (one ``prompt``, one ``response``), which is the conversation
[user: prompt, assistant: response]. It becomes tokens by the tenant's chat template
(:mod:`eraser.rendering`), and every part of the method (training, gradients, Hessian-vector
products, verification) calls :func:`record_losses`, so that there is exactly one definition of
``l(z; theta)``: the mean negative log-likelihood of the assistant tokens given the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from eraser import rendering
from eraser.devices import compute_logits, model_device
from eraser.errors import InvalidRecordsError
from eraser.rendering import IGNORE_INDEX

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
Turn = tuple[str, str]  # (role, content)


@dataclass(frozen=True)
class Record:
    """One training example, optionally about a data ``subject``.

    ``prompt`` and ``response`` are the last user turn and the final assistant turn (what
    ``modify_query`` and ``correct_response`` replace); ``turns`` is the whole conversation of a
    chat-form record (None for the short form).
    """

    id: str
    prompt: str
    response: str
    subject: str | None = None
    turns: tuple[Turn, ...] | None = None

    @classmethod
    def from_messages(cls, id: str, messages: Sequence[dict | Turn], subject: str | None = None) -> "Record":
        turns = tuple((m["role"], m["content"]) if isinstance(m, dict) else tuple(m) for m in messages)
        check_turns(turns)
        last_user = max(k for k, (role, _) in enumerate(turns) if role == "user")
        return cls(id=id, prompt=turns[last_user][1], response=turns[-1][1], subject=subject, turns=turns)

    def messages(self) -> list[dict]:
        """The conversation as OpenAI chat messages."""
        turns = self.turns or (("user", self.prompt), ("assistant", self.response))
        return [{"role": role, "content": content} for role, content in turns]

    def prompt_messages(self) -> list[dict]:
        """The conversation before its final assistant turn (what generation is asked to continue)."""
        return self.messages()[:-1]

    def with_prompt(self, prompt: str) -> "Record":
        if self.turns is None:
            return replace(self, prompt=prompt)
        last_user = max(k for k, (role, _) in enumerate(self.turns) if role == "user")
        turns = self.turns[:last_user] + (("user", prompt),) + self.turns[last_user + 1:]
        return replace(self, prompt=prompt, turns=turns)

    def with_response(self, response: str) -> "Record":
        if self.turns is None:
            return replace(self, response=response)
        return replace(self, response=response, turns=self.turns[:-1] + (("assistant", response),))

    def to_json(self) -> dict:
        row: dict = {"id": self.id}
        if self.subject is not None:
            row["subject"] = self.subject
        if self.turns is None:
            row.update(prompt=self.prompt, response=self.response)
        else:
            row["messages"] = self.messages()
        return row


def check_turns(turns: Sequence[Turn], where: str = "record") -> None:
    """A conversation the method can learn from: known roles, non-empty strings, a user turn, and an
    assistant turn last (the answer a correction replaces)."""
    if not turns:
        raise InvalidRecordsError(f"{where}: field 'messages' must be a non-empty list")
    for k, (role, content) in enumerate(turns):
        if role not in ROLES:
            raise InvalidRecordsError(f"{where}: messages[{k}].role must be one of {list(ROLES)}, got {role!r}")
        if not isinstance(content, str) or not content:
            raise InvalidRecordsError(f"{where}: messages[{k}].content must be a non-empty string")
    if turns[-1][0] != "assistant":
        raise InvalidRecordsError(f"{where}: the last message must be the assistant's (the answer learned); "
                                  f"got {turns[-1][0]!r}" if any(r == "assistant" for r, _ in turns)
                                  else f"{where}: no assistant message (nothing to learn)")
    if not any(role == "user" for role, _ in turns):
        raise InvalidRecordsError(f"{where}: no user message")


def content_id(messages: Sequence[dict]) -> str:
    """A stable id for a record given without one: a digest of its messages (roles and contents).
    The tenant store derives the same (``tenants.records``), so either side finds the record."""
    canonical = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return "sha256-" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:24]


def parse_record(obj: object, where: str) -> tuple[Record, bool]:
    """One record of either JSON form, and whether its id was derived from its content."""
    if not isinstance(obj, dict):
        raise InvalidRecordsError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    subject = obj.get("subject")
    if subject is not None and not isinstance(subject, str):
        raise InvalidRecordsError(f"{where}: field 'subject' must be a string or absent")
    if "messages" in obj:
        unknown = set(obj) - {"id", "subject", "messages"}
        if unknown:
            raise InvalidRecordsError(f"{where}: unknown field(s) {sorted(unknown)} (a chat record has id, subject, messages)")
        messages = obj["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise InvalidRecordsError(f"{where}: field 'messages' must be a list of {{role, content}} objects")
        for k, message in enumerate(messages):
            if "role" not in message or "content" not in message:
                raise InvalidRecordsError(f"{where}: messages[{k}] must have 'role' and 'content' (got {sorted(message)})")
            if message.get("weight", 1) != 1 or set(message) - {"role", "content", "weight"}:
                # OpenAI's per-turn weight 0 and tool calls would change what is learned: refused, not ignored.
                raise InvalidRecordsError(f"{where}: messages[{k}] has fields this service does not train on "
                                          f"({sorted(set(message) - {'role', 'content'})}); only role and content")
        turns = tuple((m["role"], m["content"]) for m in messages)
        check_turns(turns, where)
        derived = obj.get("id") is None
        record_id = content_id(messages) if derived else obj["id"]
        if not isinstance(record_id, str) or not record_id:
            raise InvalidRecordsError(f"{where}: field 'id' must be a non-empty string or absent")
        return Record.from_messages(record_id, turns, subject), derived
    for field in ("id", "prompt", "response"):
        if not isinstance(obj.get(field), str) or not obj[field]:
            raise InvalidRecordsError(f"{where}: field {field!r} must be a non-empty string")
    unknown = set(obj) - {"id", "subject", "prompt", "response"}
    if unknown:
        raise InvalidRecordsError(f"{where}: unknown field(s) {sorted(unknown)}")
    return Record(id=obj["id"], prompt=obj["prompt"], response=obj["response"], subject=subject), False


def iter_records_jsonl(lines: Iterable[str], source: str = "<records>") -> Iterator[Record]:
    """Parse JSON Lines of either form; errors name the source and the 1-based line number. Ids must
    be unique (two chat records with the same content and no id are the same record given twice)."""
    seen: dict[str, int] = {}
    derived = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as error:
            raise InvalidRecordsError(f"{source}:{number}: invalid JSON ({error.msg})") from None
        record, was_derived = parse_record(obj, f"{source}:{number}")
        derived += was_derived
        if record.id in seen:
            raise InvalidRecordsError(f"{source}:{number}: duplicate record id {record.id!r} (first on line {seen[record.id]})")
        seen[record.id] = number
        yield record
    if derived:
        logger.info("%s: %d record(s) had no id; ids derived from their messages (sha256)", source, derived)


def load_records(path: str | Path) -> list[Record]:
    path = Path(path)
    if not path.is_file():
        raise InvalidRecordsError(f"records file not found: {path}")
    with path.open(encoding="utf-8") as handle:
        return list(iter_records_jsonl(handle, source=str(path)))


def save_records(records: Iterable[Record], path: str | Path) -> None:
    with Path(path).open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")


def corpus_text(record: Record) -> str:
    """The record as the built-in template writes it, without special tokens: text to train a tokenizer
    or pretrain a small base on before any tokenizer (or template) exists."""
    return rendering.builtin_text(record.messages())


@dataclass
class Batch:
    """Right-padded token ids with assistant-only labels. Shapes (B, T)."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE_INDEX on context and padding

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> "Batch":
        """The batch on ``device`` (itself when it is there already)."""
        device = torch.device(device)
        if self.input_ids.device == device:
            return self
        return Batch(input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
                     labels=self.labels.to(device))


def encode(record: Record, tokenizer) -> tuple[list[int], list[int]]:
    """Token ids and labels of one record, rendered by the tokenizer's chat template (the tenant's, see
    :func:`eraser.rendering.configure`): the assistant turns are learned, the rest is context."""
    encoding = rendering.encode(tokenizer, record.messages())
    return encoding.ids, encoding.labels


def collate(records: Sequence[Record], tokenizer, device=None) -> Batch:
    """Right-padded ids, mask and labels of ``records``, on ``device`` (default: the CPU; every loss
    moves a batch to its model's device, see :func:`shifted_logits_and_labels`)."""
    encoded = [encode(record, tokenizer) for record in records]
    width = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Filled row by row on the CPU (staging), then moved to ``device`` in one copy per tensor.
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long, device="cpu")
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long, device="cpu")
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long, device="cpu")
    for row, (ids, labs) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids, device="cpu")
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(labs)] = torch.tensor(labs, device="cpu")
    batch = Batch(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    return batch.to(device) if device is not None else batch


def batches(records: Sequence[Record], tokenizer, batch_size: int, device=None) -> list[Batch]:
    return [collate(records[i : i + batch_size], tokenizer, device) for i in range(0, len(records), batch_size)]


def shifted_logits_and_labels(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits (B, T-1, V) aligned with their targets (B, T-1), on the model's device; a
    half-precision model's logits in float32 (:func:`eraser.devices.compute_logits`)."""
    batch = batch.to(model_device(model))
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
    return compute_logits(logits[:, :-1, :]), batch.labels[:, 1:]


def token_weights(labels: torch.Tensor) -> torch.Tensor:
    """Weight of each target token in its record's loss: 1/(assistant tokens) on them, 0 elsewhere."""
    mask = (labels != IGNORE_INDEX).to(torch.float64)  # (B, T)
    counts = mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return mask / counts


def losses_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-record mean response NLL (B,) from aligned logits (B, T, V) and labels (B, T)."""
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels.reshape(-1).clamp(min=0),
        reduction="none",
    ).view(labels.shape)  # (B, T)
    weights = token_weights(labels).to(nll.dtype)
    return (nll * weights).sum(dim=1)  # (B,)


def record_losses(model, batch: Batch) -> torch.Tensor:
    """``l(z_i; theta)`` for each record of the batch: mean NLL over its response tokens. Shape (B,)."""
    logits, labels = shifted_logits_and_labels(model, batch)
    return losses_from_logits(logits, labels)


@torch.no_grad()
def mean_loss(model, records: Sequence[Record], tokenizer, batch_size: int = 16) -> float:
    """Mean of ``l(z_i)`` over records (no gradient)."""
    if not records:
        return float("nan")
    return float(per_record_losses(model, records, tokenizer, batch_size).mean())


@torch.no_grad()
def per_record_losses(model, records: Sequence[Record], tokenizer, batch_size: int = 16) -> torch.Tensor:
    parts = [record_losses(model, batch) for batch in batches(records, tokenizer, batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, device=model_device(model))


@torch.no_grad()
def token_nlls(model, records: Sequence[Record], tokenizer, batch_size: int = 16) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per record: the response tokens' NLLs (a 1-D tensor each) and the record loss ``l(z)`` (n,)."""
    per_token, losses = [], []
    for batch in batches(records, tokenizer, batch_size):
        logits, labels = shifted_logits_and_labels(model, batch)  # (B, T, V), (B, T)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).clamp(min=0),
                              reduction="none").view(labels.shape)  # (B, T)
        mask = labels != IGNORE_INDEX
        per_token.extend(nll[row][mask[row]].double() for row in range(len(batch)))
        losses.append(losses_from_logits(logits, labels).double())
    return per_token, torch.cat(losses) if losses else torch.zeros(0, dtype=torch.float64, device=model_device(model))
