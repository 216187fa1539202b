"""Records, the prompt format the adapter is trained and served with, and the one loss."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from eraser.errors import InvalidRecordsError
from eraser import rendering
from eraser.records import IGNORE_INDEX, Record, collate, content_id, encode, iter_records_jsonl, record_losses

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}{{ '\\n' }}{{ m['content'] }}<|im_end|>{{ '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}")
CHATML_GENERATION = CHATML.replace(
    "{{ m['content'] }}<|im_end|>{{ '\\n' }}",
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}{{ '\\n' }}")
CONVERSATION = Record.from_messages("chat-1", [("system", "Be brief."), ("user", "Hi, I am Ada."), ("assistant", "Hello Ada."),
                                               ("user", "Where is Ada?"), ("assistant", "At home, room 42.")], "Ada Park")


def test_builtin_template_renders_the_prompt_served_and_learns_the_response(tokenizer):
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Where is Ada?"}],
                                             add_generation_prompt=True, tokenize=False)
    assert rendered == tokenizer.bos_token + "Question: Where is Ada?\nAnswer:"
    ids, labels = encode(Record(id="a", prompt="Where is Ada?", response="Home."), tokenizer)
    served = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids[: len(served)] == served and all(label == IGNORE_INDEX for label in labels[: len(served)])
    assert tokenizer("Question: Where is Ada?\nAnswer:")["input_ids"] == served  # raw completions prompt: BOS added
    learned = [label for label in labels if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == " Home." + tokenizer.eos_token


def test_only_assistant_tokens_are_learned(tokenizer, records, tiny_model):
    batch = collate(records[:3], tokenizer)
    learned = (batch.labels != IGNORE_INDEX).sum(dim=1)
    for row, record in enumerate(records[:3]):
        response = tokenizer(" " + record.response, add_special_tokens=False)["input_ids"]
        assert learned[row] == len(response) + 1  # + EOS
    losses = record_losses(tiny_model, batch)
    single = torch.stack([record_losses(tiny_model, collate([r], tokenizer))[0] for r in records[:3]])
    assert torch.allclose(losses, single, rtol=1e-10), "padding must not change a record's loss"


@pytest.fixture()
def chatml_tokenizer(tokenizer):
    chat = copy.deepcopy(tokenizer)
    chat.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return rendering.configure(chat, rendering.RecordFormat(chat_template=CHATML, max_length=512))


def test_chat_records_learn_every_assistant_turn_and_its_end_of_turn(chatml_tokenizer):
    ids, labels = encode(CONVERSATION, chatml_tokenizer)
    learned = chatml_tokenizer.decode([label for label in labels if label != IGNORE_INDEX])
    assert learned == "Hello Ada.<|im_end|>At home, room 42.<|im_end|>"
    assert rendering.stop_token_ids(chatml_tokenizer)[-1] == chatml_tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_generation_markers_and_turn_by_turn_rendering_label_the_same_tokens(chatml_tokenizer):
    plain = encode(CONVERSATION, chatml_tokenizer)
    chatml_tokenizer.chat_template = CHATML_GENERATION
    assert encode(CONVERSATION, chatml_tokenizer) == plain


def test_records_are_cut_from_the_left_to_the_tenants_limit(chatml_tokenizer):
    full_ids, full_labels = encode(CONVERSATION, chatml_tokenizer)
    chatml_tokenizer.model_max_length = 12
    ids, labels = encode(CONVERSATION, chatml_tokenizer)
    assert ids == full_ids[-12:] and labels == full_labels[-12:]


def test_a_template_that_does_not_render_the_answer_is_refused(tokenizer):
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(InvalidRecordsError, match="does not render assistant"):
        encode(CONVERSATION, chat)


def test_edits_replace_the_last_user_turn_and_the_final_answer():
    edited = CONVERSATION.with_prompt("Where is she?").with_response("Gone.")
    assert edited.messages()[-2:] == [{"role": "user", "content": "Where is she?"}, {"role": "assistant", "content": "Gone."}]
    assert edited.messages()[:3] == CONVERSATION.messages()[:3] and (edited.prompt, edited.response) == ("Where is she?", "Gone.")


def test_chat_records_without_an_id_get_a_stable_one_from_their_content():
    line = json.dumps({"messages": CONVERSATION.messages(), "subject": "Ada Park"})
    (first,) = iter_records_jsonl([line])
    (again,) = iter_records_jsonl([line])
    assert first.id == again.id == content_id(CONVERSATION.messages()) and first.turns == CONVERSATION.turns
    with pytest.raises(InvalidRecordsError, match=":2: duplicate record id"):
        list(iter_records_jsonl([line, line]))


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"id": "a", "prompt": "p", "response": "r"}', "{oops"], ":2: invalid JSON"),
        (['{"id": "a", "prompt": "p", "response": "r"}'] * 2, ":2: duplicate record id 'a'"),
        (['{"id": "a", "prompt": "", "response": "r"}'], ":1: field 'prompt'"),
        (['{"id": "a", "prompt": "p", "response": "r", "extra": 1}'], "unknown field"),
        (['[1, 2]'], "expected a JSON object"),
        (['{"messages": [{"role": "user", "content": "hi"}]}'], ":1: no assistant message"),
        (['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}, '
          '{"role": "user", "content": "and?"}]}'], "last message must be the assistant's"),
        (['{"messages": [{"role": "bot", "content": "hi"}]}'], r"messages\[0\].role must be one of"),
        (['{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "ok"}]}'],
         r"messages\[0\].content must be a non-empty string"),
        (['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok", "weight": 0}]}'],
         "does not train on"),
        (['{"messages": "hi"}'], "must be a list"),
    ],
)
def test_malformed_records_name_the_line(lines, message):
    with pytest.raises(InvalidRecordsError, match=message.replace("(", r"\(")):
        list(iter_records_jsonl(lines, source="records.jsonl"))
