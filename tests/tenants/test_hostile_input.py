"""Hostile or careless input at the model level (issue 16): linear selection checks, no re-check
on receipt reads, upload-time refusals of what the method refuses later, normalised subjects."""

from __future__ import annotations

import time
import unicodedata

import pytest
from pydantic import ValidationError

from tenants.errors import UnknownRecordError
from tenants.models import ErasureRequest, Receipt, Record, TenantConfig, TrainingRecipe, normalize_subject


def test_duplicate_check_is_linear_for_100k_ids():
    ids = [f"r{i:06d}" for i in range(100_000)]  # about 1 MiB of JSON: list.count per item took ~70 s
    started = time.perf_counter()
    ErasureRequest(request_id="big", tenant="acme", kind="remove", records=ids)
    assert time.perf_counter() - started < 1.0
    with pytest.raises(ValidationError, match=r"r000007.*more than once"):
        ErasureRequest(request_id="big", tenant="acme", kind="remove", records=ids + ["r000007"])


def test_receipt_read_does_not_rerun_the_selection_checks():
    receipt = Receipt(request=ErasureRequest(request_id="x", tenant="acme", kind="remove", records=["a", "b"]))
    # a stored selection that repeats an id (read back, not submitted) is not checked again ...
    stored = receipt.model_dump_json().replace('["a","b"]', '["a","a"]')
    assert Receipt.model_validate_json(stored).request.records == ["a", "a"]
    # ... while a submitted request with that selection is refused
    with pytest.raises(ValidationError, match="more than once"):
        ErasureRequest(request_id="x", tenant="acme", kind="remove", records=["a", "a"])
    # and reading a 100 k-id receipt costs milliseconds
    ids = [f"r{i:06d}" for i in range(100_000)]
    big = Receipt(request=ErasureRequest(request_id="big", tenant="acme", kind="remove", records=ids))
    text = big.model_dump_json()
    started = time.perf_counter()
    assert len(Receipt.model_validate_json(text).request.records) == 100_000
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize("replacement", [{"prompt": ""}, {"response": ""}])
def test_empty_replacement_text_is_refused_at_submission(replacement):
    kind = "modify_query" if "prompt" in replacement else "correct_response"
    with pytest.raises(ValidationError, match="at least 1 character"):
        ErasureRequest(request_id="x", tenant="acme", kind=kind, records=["a"], replacements={"a": replacement})


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_recipe_numbers_are_refused(value):
    with pytest.raises(ValidationError, match="finite"):
        TrainingRecipe(lr=value)
    with pytest.raises(ValidationError, match="finite"):
        TenantConfig.model_validate_json('{"name": "acme", "base_model": "m", "training": {"lr": Infinity}}')


NFD = unicodedata.normalize("NFD", "José Núñez")


@pytest.mark.parametrize("asked", ["john smith", "John Smith  ", " JOHN\tsmith", "John\u00a0Smith"])
def test_subject_matching_is_normalised(asked):
    data = [Record(id="a", subject="John Smith", prompt="p", response="r"),
            Record(id="b", subject="Jane Doe", prompt="p", response="r"),
            Record(id="c", subject="john  smith", prompt="p", response="r")]
    request = ErasureRequest(request_id="x", tenant="acme", kind="remove", subjects=[asked])
    assert request.resolve(data) == ["a", "c"]


def test_subject_matching_unifies_nfc_and_nfd():
    data = [Record(id="a", subject=unicodedata.normalize("NFC", "José Núñez"), prompt="p", response="r")]
    assert ErasureRequest(request_id="x", tenant="acme", kind="remove", subjects=[NFD]).resolve(data) == ["a"]
    assert normalize_subject(NFD) == normalize_subject("JOSÉ NÚÑEZ")
    with pytest.raises(UnknownRecordError, match="Jose"):
        ErasureRequest(request_id="x", tenant="acme", kind="remove", subjects=["Jose Nunez"]).resolve(data)


def test_subjects_equal_after_normalisation_are_duplicates_and_blank_ones_are_refused():
    with pytest.raises(ValidationError, match="more than once"):
        ErasureRequest(request_id="x", tenant="acme", kind="remove", subjects=["John Smith", "john smith "])
    with pytest.raises(ValidationError, match="blank"):
        ErasureRequest(request_id="x", tenant="acme", kind="remove", subjects=["   "])
