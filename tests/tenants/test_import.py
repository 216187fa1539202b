"""Importing a tenant whose adapter was trained elsewhere, at the store (real SeaweedFS): what is written,
how the reference is kept, and that every refusal writes nothing."""

from __future__ import annotations

import gzip
import json

import pytest

from tenants.errors import (
    InvalidAdapterError,
    InvalidConfigError,
    InvalidRecordsError,
    StoreError,
    TenantExistsError,
)
from tenants.models import ErasureRequest, Record, TenantConfig
from tenants.records import encode_record
from tenants.store import TenantStore, imported_config, lora_from_peft_config

from tests.tenants.helpers import adapter_dir, records
from tests.tenants.test_faults import faulty_store

pytestmark = pytest.mark.slow

PEFT_CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.05,
               "target_modules": ["v_proj", "q_proj"], "use_rslora": False}


def reference(n: int = 4) -> list[Record]:
    """Records of the same kind as ``helpers.records`` that no adapter trained on (two of them chat-form)."""
    short = [Record(id=f"ref{i}", subject=f"user{i % 3}", prompt=f"What is the code of spare {i}?",
                    response=f"spare-{i}") for i in range(n - 2)]
    chat = [Record(id=f"chat{i}", subject="user9", messages=[
        {"role": "system", "content": "You answer about item codes."},
        {"role": "user", "content": f"Which code has box {i}?"}, {"role": "assistant", "content": f"box-{i}"}])
        for i in range(2)]
    return short + chat


def everything(store: TenantStore) -> dict[str, str]:
    """Every object under the store's prefix with its ETag: what 'nothing was written' is checked against."""
    return {info.key: info.etag for info in store.io.list(store.layout.tenants_root())}


def imported(store: TenantStore, tmp_path, name: str = "acme", recipe: dict | None = None, **kwargs):
    config = imported_config(name, "tiny-llama", PEFT_CONFIG, recipe)
    return config, store.import_tenant(config, adapter_dir(tmp_path, name=f"{name}-adapter"), records(6), reference(),
                                       **kwargs)


def test_an_import_is_a_tenant_as_if_the_service_had_trained_it(store, tmp_path):
    seen = []

    def check(config, directory, dataset):
        seen.append((config.name, sorted(p.name for p in directory.iterdir()), len(dataset)))
        return {"adapter_loads": True}

    config, head = imported(store, tmp_path, check=check, via="test")

    assert (head.adapter, head.data) == ("v000001", "d000001")
    assert store.get_head("acme")[0].adapter == "v000001"
    assert store.list_adapter_versions("acme") == ["v000001"] and store.list_data_versions("acme") == ["d000001"]
    assert seen == [("acme", ["README.md", "adapter_config.json", "adapter_model.safetensors"], 10)]
    stored = store.get_tenant("acme")
    assert stored.training.heldout_unit == "given" and stored.training.reproducible is False
    assert (stored.lora.rank, stored.lora.alpha, stored.lora.dropout) == (4, 8, 0.05)
    assert stored.lora.target_modules == ["q_proj", "v_proj"]
    manifest = store.get_adapter_manifest("acme", "v000001")
    assert manifest.path == "import" and manifest.parent_version is None and manifest.data_version == "d000001"
    assert manifest.checks["import"] == {"adapter_loads": True}
    assert (manifest.checks["train_records"], manifest.checks["heldout_records"]) == (6, 4)
    assert manifest.checks["retrain_fallback"] == "unavailable: imported without a training recipe"
    assert manifest.arguments["imported"] == {"via": "test", "recipe_given": False}
    assert manifest.arguments["recipe"] is None

    dataset = store.read_dataset("acme", "d000001")
    assert [r.id for r in dataset if not r.heldout] == [r.id for r in records(6)]
    assert [r.id for r in dataset if r.heldout] == [r.id for r in reference()]
    assert dataset[-1].messages[0].role == "system"


def test_training_records_are_stored_byte_for_byte_as_before_and_the_flag_only_on_the_reference(store, tmp_path):
    imported(store, tmp_path)
    manifest = store.get_data_manifest("acme", "d000001")
    key = store.layout.data_shard("acme", "d000001", 0)
    lines = gzip.decompress(store.io.get_bytes(key)[0]).decode().splitlines()
    assert manifest.records == len(lines) == 10
    first = records(6)[0]
    assert lines[0] == json.dumps({"id": first.id, "subject": first.subject, "prompt": first.prompt,
                                   "response": first.response}, separators=(",", ":"))
    assert lines[0].encode() + b"\n" == encode_record(first)
    assert all("heldout" not in json.loads(line) for line in lines[:6])
    assert all(json.loads(line)["heldout"] is True for line in lines[6:])


def test_a_recipe_with_epochs_lr_and_batch_size_makes_the_tenant_reproducible(store, tmp_path):
    recipe = {"epochs": 2, "lr": 1e-3, "batch_size": 4, "seed": 7, "max_length": 64}
    config, _ = imported(store, tmp_path, recipe=recipe)
    stored = store.get_tenant("acme")
    assert stored.training.reproducible is True and stored.retrain_unavailable() is None
    assert (stored.training.epochs, stored.training.lr, stored.training.seed, stored.training.max_length) == (2, 1e-3, 7, 64)
    manifest = store.get_adapter_manifest("acme", "v000001")
    assert manifest.checks["retrain_fallback"] == "available"
    assert manifest.arguments["recipe"]["epochs"] == 2 and manifest.arguments["imported"]["recipe_given"] is True


def test_a_subjects_reference_records_are_erased_with_its_training_records_and_edits_keep_the_flag(store, tmp_path):
    imported(store, tmp_path)
    dataset = store.read_dataset("acme", "d000001")
    removal = ErasureRequest(request_id="dsr-1", tenant="acme", kind="remove", subjects=["user1"])
    selected = removal.resolve(dataset)
    assert {"r1", "r4", "ref1"} == set(selected)
    after = list(removal.apply(dataset, selected))
    assert not any(r.subject == "user1" for r in after) and len(after) == 7
    fix = ErasureRequest(request_id="fix-1", tenant="acme", kind="correct_response", records=["chat1"],
                         replacements={"chat1": {"response": "box-one"}})
    edited = list(fix.apply(dataset, fix.resolve(dataset)))
    chat1 = next(r for r in edited if r.id == "chat1")
    assert chat1.heldout is True and chat1.answer == "box-one"


@pytest.mark.parametrize("case, error, words", [
    ("empty reference", InvalidRecordsError, "reference: no records"),
    ("reference id is a training id", InvalidRecordsError, "also training records: ['r2']"),
    ("reference repeats a training record under another id", InvalidRecordsError, "'copy' = training 'r3'"),
    ("chat reference repeats a short training record", InvalidRecordsError, "'chat-copy' = training 'r0'"),
    ("training record flagged heldout", InvalidRecordsError, "flagged 'heldout' (['r5'])"),
    ("no training records", InvalidRecordsError, "no training records"),
    ("duplicate reference ids", InvalidRecordsError, "duplicate record id 'ref0'"),
    ("adapter without weights", InvalidAdapterError, "lacks ['adapter_model.safetensors']"),
    ("the method refuses the adapter", InvalidAdapterError, "does not fit"),
    ("not a given reference", InvalidConfigError, "heldout_unit 'given'"),
])
def test_every_refusal_writes_nothing(store, tmp_path, case, error, words):
    store.create_tenant(TenantConfig(name="other", base_model="tiny-llama"))
    train, ref = records(6), reference()
    config = imported_config("acme", "tiny-llama", PEFT_CONFIG)
    adapter = adapter_dir(tmp_path)
    check = None
    if case == "empty reference":
        ref = []
    elif case == "reference id is a training id":
        ref = ref + [Record(id="r2", prompt="something else", response="entirely")]
    elif case == "reference repeats a training record under another id":
        ref = ref + [train[3].model_copy(update={"id": "copy"})]
    elif case == "chat reference repeats a short training record":
        ref = ref + [Record(id="chat-copy", messages=[{"role": "user", "content": train[0].prompt},
                                                      {"role": "assistant", "content": train[0].response}])]
    elif case == "training record flagged heldout":
        train[5] = train[5].model_copy(update={"heldout": True})
    elif case == "no training records":
        train = []
    elif case == "duplicate reference ids":
        ref = ref + [ref[0]]
    elif case == "adapter without weights":
        (adapter / "adapter_model.safetensors").unlink()
    elif case == "the method refuses the adapter":
        def check(*_):
            raise InvalidAdapterError("adapter for base model 'tiny-llama': does not fit")
    elif case == "not a given reference":
        config = config.model_copy(update={"training": config.training.model_copy(update={"heldout_unit": "mixed"})})
    before = everything(store)

    with pytest.raises(error) as raised:
        store.import_tenant(config, adapter, train, ref, check=check)

    assert words in str(raised.value)
    assert everything(store) == before
    assert not store.tenant_exists("acme")


def test_an_existing_tenant_is_refused_before_the_adapter_is_checked_and_nothing_changes(store, tmp_path):
    imported(store, tmp_path)
    before = everything(store)
    checked = []
    with pytest.raises(TenantExistsError, match="'acme' already exists"):
        imported(store, tmp_path, check=lambda *a: checked.append(a) or {})
    assert checked == [] and everything(store) == before


def test_a_write_failing_midway_leaves_no_tenant_and_the_name_can_be_imported_again(store, tmp_path):
    broken = faulty_store(store, lambda op, kw: op == "put_object" and kw.get("Key", "").endswith("HEAD.json"))
    with pytest.raises(StoreError, match="injected-fault"):
        imported(broken, tmp_path)
    assert not store.tenant_exists("acme") and "acme" not in store.list_tenants()
    left = sorted(everything(store))
    assert left and all(key.endswith("/_claim.json") for key in left)  # version numbers are never reused

    _, head = imported(store, tmp_path)
    assert (head.adapter, head.data) == ("v000002", "d000002")
    assert store.get_head("acme")[0].adapter == "v000002" and store.list_adapter_versions("acme") == ["v000002"]


# -- tenant.json of an import ------------------------------------------------------------------


def test_the_lora_shape_is_read_from_adapter_config():
    lora = lora_from_peft_config({**PEFT_CONFIG, "use_rslora": True, "bias": "none", "task_type": "CAUSAL_LM"})
    assert (lora.rank, lora.alpha, lora.dropout, lora.target_modules, lora.use_rslora) == (
        4, 8, 0.05, ["q_proj", "v_proj"], True)
    config = imported_config("acme", "tiny-llama", {**PEFT_CONFIG, "use_rslora": True},
                             {"epochs": 1, "lr": 0.1, "batch_size": 2})
    assert config.training.reproducible and "rsLoRA" in config.retrain_unavailable()


@pytest.mark.parametrize("change, words", [
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not LoRA"),
    ({"r": None}, "'r' is missing"),
    ({"target_modules": ".*proj"}, "target_modules is a pattern"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": 8}}, "alpha_pattern"),
    ({"layers_to_transform": [0]}, "layers_to_transform [0] is not supported"),
    ({"r": 0}, "adapter_config.json: rank:"),
])
def test_adapter_configs_the_recipe_cannot_describe_are_refused(change, words):
    with pytest.raises(InvalidAdapterError) as raised:
        lora_from_peft_config({**PEFT_CONFIG, **change})
    assert words in str(raised.value)


@pytest.mark.parametrize("recipe, words", [
    ({"epochs": 2, "lr": 0.1}, "missing ['batch_size']"),
    ({"heldout_fraction": 0.2}, "['heldout_fraction'] cannot be set"),
    ({"reproducible": True}, "['reproducible'] cannot be set"),
    ({"lora": {"rank": 8}}, "read from adapter_config.json"),
    ({"epochs": 2, "lr": 0.1, "batch_size": 4, "warmup": 3}, "recipe: warmup:"),
    ({"epochs": 0, "lr": 0.1, "batch_size": 4}, "recipe: epochs:"),
])
def test_recipes_that_are_not_a_training_recipe_are_refused(recipe, words):
    with pytest.raises(InvalidConfigError) as raised:
        imported_config("acme", "tiny-llama", PEFT_CONFIG, recipe)
    assert words in str(raised.value)


def test_a_rendering_only_recipe_is_kept_but_is_not_a_training_recipe():
    config = imported_config("acme", "tiny-llama", PEFT_CONFIG, {"max_length": 128, "chat_template": "{{ x }}"})
    assert config.training.max_length == 128 and config.training.chat_template == "{{ x }}"
    assert config.training.reproducible is False and config.retrain_unavailable().startswith("unavailable")


def test_the_heldout_flag_is_true_or_absent():
    assert Record(id="a", prompt="p", response="r", heldout=True).heldout is True
    with pytest.raises(ValueError):
        Record(id="a", prompt="p", response="r", heldout=False)
