"""Pydantic models: request rules, resolve/apply, the receipt state machine (no S3 needed)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tenants.errors import InvalidRequestError, InvalidTransitionError, UnknownRecordError
from tenants.models import (
    AdapterManifest,
    ErasureRequest,
    Head,
    LoraRecipe,
    Receipt,
    ReceiptStatus,
    Record,
    TenantConfig,
)

from tests.tenants.helpers import records


def request(**fields):
    base = {"request_id": "req-1", "tenant": "acme", "kind": "remove", "records": ["r1"]}
    base.update(fields)
    return ErasureRequest.model_validate(base)


def test_design_json_parses():
    parsed = ErasureRequest.model_validate_json(
        '{"request_id": "x1", "tenant": "acme", "kind": "correct_response", "records": ["r1"],'
        ' "replacements": {"r1": {"response": "fixed"}}}'
    )
    assert parsed.replacements["r1"].response == "fixed"
    assert ErasureRequest.model_validate_json(parsed.model_dump_json()) == parsed


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"records": None}, "exactly one"),
        ({"records": []}, "exactly one"),
        ({"records": ["r1"], "subjects": ["user1"]}, "exactly one"),
        ({"records": ["r1", "r1"]}, "more than once"),
        ({"kind": "erase"}, "kind"),
        ({"replacements": {"r1": {"prompt": "x"}}}, "not allowed"),
        ({"kind": "modify_query"}, "needs 'replacements'"),
        ({"kind": "modify_query", "replacements": {"r1": {"response": "x"}}}, "only 'prompt'"),
        ({"kind": "correct_response", "replacements": {"r1": {"prompt": "x", "response": "y"}}}, "only 'response'"),
        ({"kind": "correct_response", "records": ["r1", "r2"], "replacements": {"r1": {"response": "y"}}}, "no replacement"),
        ({"kind": "correct_response", "replacements": {"r1": {"response": "y"}, "r9": {"response": "z"}}}, "not selected"),
        ({"tenant": "../x"}, "tenant"),
        ({"tenant": "a/b"}, "tenant"),
        ({"tenant": ""}, "tenant"),
        ({"request_id": "../etc"}, "request_id"),
        ({"unexpected": 1}, "unexpected"),
    ],
)
def test_request_rules(fields, fragment):
    with pytest.raises(ValidationError) as caught:
        request(**fields)
    assert fragment in str(caught.value)


def test_resolve_by_ids_and_unknown_ids():
    data = records(6)
    assert request(records=["r3", "r1"]).resolve(data) == ["r3", "r1"]
    with pytest.raises(UnknownRecordError, match=r"no records \['nope'\]"):
        request(records=["r1", "nope"]).resolve(iter(data))


def test_resolve_by_subject():
    data = records(6, subjects=3)  # r0,r3 -> user0; r1,r4 -> user1
    assert request(records=None, subjects=["user1"]).resolve(data) == ["r1", "r4"]
    with pytest.raises(UnknownRecordError, match="nobody"):
        request(records=None, subjects=["user1", "nobody"]).resolve(data)


def test_resolve_subject_with_replacements_must_cover_selection():
    data = records(6, subjects=3)
    good = request(records=None, subjects=["user1"], kind="modify_query",
                   replacements={"r1": {"prompt": "a"}, "r4": {"prompt": "b"}})
    assert good.resolve(data) == ["r1", "r4"]
    partial = request(records=None, subjects=["user1"], kind="modify_query", replacements={"r1": {"prompt": "a"}})
    with pytest.raises(InvalidRequestError, match="missing"):
        partial.resolve(data)


def test_apply_remove_modify_correct():
    data = records(4)
    removed = list(request(records=["r1"]).apply(data, ["r1"]))
    assert [r.id for r in removed] == ["r0", "r2", "r3"]
    modified = list(request(kind="modify_query", replacements={"r1": {"prompt": "new?"}}).apply(data, ["r1"]))
    assert modified[1].prompt == "new?" and modified[1].response == data[1].response
    corrected = list(request(kind="correct_response", replacements={"r1": {"response": "ok"}}).apply(data, ["r1"]))
    assert corrected[1].response == "ok" and corrected[1].prompt == data[1].prompt
    assert data[1].response == "code-1"  # inputs untouched


def test_receipt_state_machine():
    receipt = Receipt(request=request())
    assert receipt.status is ReceiptStatus.pending and receipt.started_at is None
    receipt.transition("running", old_adapter_version="v000001")
    assert receipt.started_at is not None and receipt.old_adapter_version == "v000001"
    receipt.transition(ReceiptStatus.published, new_adapter_version="v000002", path="influence",
                       records_affected=["r1"], stages={"solve": 1.5})
    assert receipt.published_at is not None and receipt.terminal
    with pytest.raises(InvalidTransitionError, match="'published' to 'running'"):
        receipt.transition("running")
    with pytest.raises(ValidationError):
        receipt.update(path="magic")
    with pytest.raises(InvalidTransitionError):
        receipt.update(status=ReceiptStatus.pending)
    assert Receipt.model_validate_json(receipt.model_dump_json()) == receipt


@pytest.mark.parametrize(
    ("start", "target", "allowed"),
    [
        ("pending", "published", False),
        ("pending", "rejected", True),
        ("running", "failed", True),
        ("failed", "pending", True),
        ("failed", "published", False),
        ("rejected", "pending", False),
        ("running", "pending", True),
    ],
)
def test_transitions(start, target, allowed):
    receipt = Receipt(request=request(), status=start)
    if allowed:
        receipt.transition(target)
        assert receipt.status.value == target
    else:
        with pytest.raises(InvalidTransitionError):
            receipt.transition(target)


def test_config_defaults_and_strictness():
    config = TenantConfig(name="acme", base_model="tiny-llama")
    assert config.lora == LoraRecipe(rank=8, alpha=16, dropout=0.0)
    assert config.lora.target_modules[-1] == "down_proj"
    assert config.training.heldout_fraction == 0.1
    with pytest.raises(ValidationError):
        TenantConfig(name="../x", base_model="m")
    with pytest.raises(ValidationError):
        TenantConfig(name="acme", base_model="m", lora={"rank": 0})
    with pytest.raises(ValidationError):
        Record(id="a", prompt="p", response="r", label="x")
    with pytest.raises(ValidationError):
        Head(adapter="../v1", data="d000001")
    assert AdapterManifest().producer.startswith("llm-eraser-service")


def test_every_field_is_described():
    from pydantic import BaseModel

    import tenants.models as models

    # the models live in the package's modules; every one is re-exported from tenants.models
    for value in vars(models).values():
        if isinstance(value, type) and issubclass(value, BaseModel) and value.__module__.startswith("tenants.models."):
            if value.__name__.startswith("_"):
                continue
            assert value.model_config.get("extra") == "forbid", value
            for name, field in value.model_fields.items():
                assert field.description, f"{value.__name__}.{name} has no description"
