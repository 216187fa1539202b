"""Training records, their prompt format, tokenisation and THE loss.

Every part of the method (training, gradients, Hessian-vector products, verification) calls
:func:`record_losses` so that there is exactly one definition of ``l(z; theta)``: the mean negative
log-likelihood of the response tokens given the prompt (prompt tokens are masked out).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from eraser.errors import InvalidRecordsError

# The prompt template. The serving layer formats completions with the same function (and the
# tokenizer's chat template renders the same text), so that what was trained is what is served.
PROMPT_TEMPLATE = "Question: {prompt}\nAnswer:"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Record:
    """One training example: ``prompt`` -> ``response``, optionally about a data ``subject``."""

    id: str
    prompt: str
    response: str
    subject: str | None = None

    def with_prompt(self, prompt: str) -> "Record":
        return replace(self, prompt=prompt)

    def with_response(self, response: str) -> "Record":
        return replace(self, response=response)


def format_prompt(prompt: str) -> str:
    return PROMPT_TEMPLATE.format(prompt=prompt)


def format_response(response: str) -> str:
    return " " + response


def parse_record(obj: object, where: str) -> Record:
    if not isinstance(obj, dict):
        raise InvalidRecordsError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for field in ("id", "prompt", "response"):
        if not isinstance(obj.get(field), str) or not obj[field]:
            raise InvalidRecordsError(f"{where}: field {field!r} must be a non-empty string")
    subject = obj.get("subject")
    if subject is not None and not isinstance(subject, str):
        raise InvalidRecordsError(f"{where}: field 'subject' must be a string or absent")
    unknown = set(obj) - {"id", "subject", "prompt", "response"}
    if unknown:
        raise InvalidRecordsError(f"{where}: unknown field(s) {sorted(unknown)}")
    return Record(id=obj["id"], prompt=obj["prompt"], response=obj["response"], subject=subject)


def iter_records_jsonl(lines: Iterable[str], source: str = "<records>") -> Iterator[Record]:
    """Parse JSON Lines; errors name the source and the 1-based line number. Ids must be unique."""
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as error:
            raise InvalidRecordsError(f"{source}:{number}: invalid JSON ({error.msg})") from None
        record = parse_record(obj, f"{source}:{number}")
        if record.id in seen:
            raise InvalidRecordsError(f"{source}:{number}: duplicate record id {record.id!r}")
        seen.add(record.id)
        yield record


def load_records(path: str | Path) -> list[Record]:
    path = Path(path)
    if not path.is_file():
        raise InvalidRecordsError(f"records file not found: {path}")
    with path.open(encoding="utf-8") as handle:
        return list(iter_records_jsonl(handle, source=str(path)))


def save_records(records: Iterable[Record], path: str | Path) -> None:
    with Path(path).open("w", encoding="utf-8") as handle:
        for record in records:
            row = {"id": record.id, "subject": record.subject, "prompt": record.prompt, "response": record.response}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


@dataclass
class Batch:
    """Right-padded token ids with response-only labels. Shapes (B, T)."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE_INDEX on prompt and padding

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def encode(record: Record, tokenizer, max_length: int = 256) -> tuple[list[int], list[int]]:
    """Token ids and labels of one record: BOS + prompt (masked) + response + EOS (learned)."""
    prompt_ids = tokenizer(format_prompt(record.prompt), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(format_response(record.response), add_special_tokens=False)["input_ids"]
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = prefix + prompt_ids + response_ids + [tokenizer.eos_token_id]
    labels = [IGNORE_INDEX] * (len(prefix) + len(prompt_ids)) + response_ids + [tokenizer.eos_token_id]
    if len(ids) > max_length:  # keep the response: cut the prompt from the left
        cut = len(ids) - max_length
        ids, labels = ids[cut:], labels[cut:]
    return ids, labels


def collate(records: Sequence[Record], tokenizer, max_length: int = 256) -> Batch:
    encoded = [encode(record, tokenizer, max_length) for record in records]
    width = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, labs) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(labs)] = torch.tensor(labs)
    return Batch(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def batches(records: Sequence[Record], tokenizer, batch_size: int, max_length: int = 256) -> list[Batch]:
    return [collate(records[i : i + batch_size], tokenizer, max_length) for i in range(0, len(records), batch_size)]


def shifted_logits_and_labels(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits (B, T-1, V) aligned with their targets (B, T-1)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
    return logits[:, :-1, :], batch.labels[:, 1:]


def token_weights(labels: torch.Tensor) -> torch.Tensor:
    """Weight of each target token in its record's loss: 1/(response tokens) on response, 0 elsewhere."""
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
    return torch.cat(parts) if parts else torch.zeros(0)


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
    return per_token, torch.cat(losses) if losses else torch.zeros(0, dtype=torch.float64)
