"""Records, the prompt format the adapter is trained and served with, and the one loss."""

from __future__ import annotations

import pytest
import torch

from eraser.errors import InvalidRecordsError
from eraser.records import IGNORE_INDEX, Record, collate, encode, format_prompt, iter_records_jsonl, record_losses


def test_chat_template_renders_exactly_the_training_prompt(tokenizer):
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Where is Ada?"}],
                                             add_generation_prompt=True, tokenize=False)
    assert rendered == tokenizer.bos_token + format_prompt("Where is Ada?")
    ids, labels = encode(Record(id="a", prompt="Where is Ada?", response="Home."), tokenizer)
    served = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids[: len(served)] == served and all(label == IGNORE_INDEX for label in labels[: len(served)])
    assert tokenizer(format_prompt("Where is Ada?"))["input_ids"] == served  # raw completions prompt: BOS added


def test_only_response_tokens_are_learned(tokenizer, records, tiny_model):
    batch = collate(records[:3], tokenizer)
    learned = (batch.labels != IGNORE_INDEX).sum(dim=1)
    for row, record in enumerate(records[:3]):
        response = tokenizer(" " + record.response, add_special_tokens=False)["input_ids"]
        assert learned[row] == len(response) + 1  # + EOS
    losses = record_losses(tiny_model, batch)
    single = torch.stack([record_losses(tiny_model, collate([r], tokenizer))[0] for r in records[:3]])
    assert torch.allclose(losses, single, rtol=1e-10), "padding must not change a record's loss"


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"id": "a", "prompt": "p", "response": "r"}', "{oops"], ":2: invalid JSON"),
        (['{"id": "a", "prompt": "p", "response": "r"}'] * 2, ":2: duplicate record id 'a'"),
        (['{"id": "a", "prompt": "", "response": "r"}'], ":1: field 'prompt'"),
        (['{"id": "a", "prompt": "p", "response": "r", "extra": 1}'], "unknown field"),
        (['[1, 2]'], "expected a JSON object"),
    ],
)
def test_malformed_records_name_the_line(lines, message):
    with pytest.raises(InvalidRecordsError, match=message.replace("(", r"\(")):
        list(iter_records_jsonl(lines, source="records.jsonl"))
