"""Concepts that live on both sides of the layering (the method knows no tenants, the tenants no torch)
must agree: a record read by the store and by the method is the same record, with the same derived id."""

from __future__ import annotations

import json

import pytest

from eraser import records as method_records
from tenants import models as tenant_models
from tenants import records as tenant_records

LINES = [
    {"messages": [{"role": "user", "content": "What is Ada's email?"}, {"role": "assistant", "content": "ada@mail.test"}]},
    {"messages": [{"role": "system", "content": "Support desk."}, {"role": "user", "content": "Où vit Zoë ?"},
                  {"role": "assistant", "content": "À Liège — 4000."}, {"role": "user", "content": "Et son code ?"},
                  {"role": "assistant", "content": "Code 7-71."}], "subject": "Zoë"},
    {"id": "given", "prompt": "What is Ben's city?", "response": "Ben lives in city 114.", "subject": "Ben"},
]


@pytest.mark.parametrize("line", LINES, ids=["chat", "multi-turn unicode", "prompt-response"])
def test_the_store_and_the_method_read_one_line_as_one_record(line):
    text = json.dumps(line, ensure_ascii=False)
    (stored,) = list(tenant_records.parse_jsonl([text]))
    (method,) = list(method_records.iter_records_jsonl([text]))
    assert stored.id == method.id
    assert stored.subject == method.subject
    assert tenant_records.content_key(stored) == tuple((m["role"], m["content"]) for m in method.messages())
    if "messages" in line:
        assert stored.id == tenant_models.content_id(line["messages"]) == method_records.content_id(line["messages"])
        assert stored.id.startswith("sha256-")


def test_the_derived_ids_differ_when_any_role_or_content_does():
    messages = LINES[1]["messages"]
    ids = {method_records.content_id(messages)}
    for k in range(len(messages)):
        for field, value in (("content", messages[k]["content"] + " "), ("role", "user" if messages[k]["role"] != "user" else "assistant")):
            changed = [dict(m) for m in messages]
            changed[k][field] = value
            assert tenant_models.content_id(changed) == method_records.content_id(changed)
            ids.add(method_records.content_id(changed))
    assert len(ids) == 1 + 2 * len(messages)
