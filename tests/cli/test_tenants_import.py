"""`eraser tenants import` end to end: a real tiny base, adapters made with plain PEFT (as another platform
would have them), the session's S3 server; then the cluster layer's view of the imported tenant (its
split by the flag, its recipe) and an erasure on it through the coordinator."""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cli.main import main
from cli.synthetic import customer_records
from eraser.model import MODEL_CONSTRUCTION
from tenants.models import Record
from tests.cluster.helpers import PIPELINE, build_base

pytestmark = pytest.mark.slow

BASE_NAME = "tiny-llama"
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


# -- the world: a base, the records, adapters made without eraser.training -------------------------


def chat_records(customers: int = 10, per_customer: int = 4) -> list[Record]:
    """A platform's records in the OpenAI chat fine-tuning form (system, user, assistant)."""
    return [Record(id=r.id, subject=r.subject, messages=r.messages())
            for r in customer_records(customers, per_customer, seed=5, id_prefix="acme", chat=True)]


def split(records: list[Record]) -> tuple[list[Record], list[Record]]:
    """What the platform trained on and what it did not: every subject's last record, and two whole
    subjects, are the reference (records of the same kind the adapter never saw)."""
    subjects = sorted({r.subject for r in records})
    last = {r.subject: r.id for r in records}
    held = [r for r in records if r.subject in subjects[-2:] or r.id == last[r.subject]]
    return [r for r in records if r not in held], held


def peft_adapter(base_dir: Path, records: list[Record], out: Path, steps: int = 30, **lora) -> Path:
    """An adapter as another platform makes one: PEFT's get_peft_model, a plain AdamW loop on the
    rendered conversations (loss on every token), save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    with MODEL_CONSTRUCTION:
        base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    model = get_peft_model(base,
                           LoraConfig(task_type="CAUSAL_LM", **{**LORA, **lora}))
    texts = [tokenizer.apply_chat_template([m.model_dump(exclude_none=True) for m in r.messages], tokenize=False)
             for r in records]
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        batch = (texts * 2)[(step * 8) % len(texts):][:8]
        encoded = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        loss = model(**encoded, labels=encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.save_pretrained(str(out))
    return out


def other_base(out: Path) -> Path:
    """A base of another shape (hidden 96): adapters made for it do not fit the tests' base."""
    from eraser.model import BaseModelConfig, build_base_model, save_base_model, train_tokenizer
    from eraser.records import corpus_text

    tokenizer = train_tokenizer([corpus_text(r) for r in customer_records(20, 5, seed=0)], vocab_size=320)
    config = BaseModelConfig(vocab_size=320, hidden_size=96, intermediate_size=128, num_hidden_layers=1,
                             num_attention_heads=3, num_key_value_heads=3, max_position_embeddings=128)
    return save_base_model(build_base_model(config, tokenizer, seed=0), tokenizer, out)


@contextlib.contextmanager
def one_torch_thread():
    """Torch on one thread while a module's world is built and its tests run (two shared cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def write_jsonl(path: Path, records: list[Record] | list[dict]) -> Path:
    lines = [r.model_dump_json(exclude_none=True) if isinstance(r, Record) else json.dumps(r) for r in records]
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with one_torch_thread():
        root = tmp_path_factory.mktemp("import-cli")
        base = build_base(root / "base")
        train, reference = split(chat_records())
        files = {
            "base": base, "train_file": write_jsonl(root / "train.jsonl", train),
            "reference_file": write_jsonl(root / "reference.jsonl", reference),
            "adapter": peft_adapter(base, train, root / "adapter"),
            "dora": peft_adapter(base, train, root / "dora", steps=1, use_dora=True),
            "foreign": peft_adapter(other_base(root / "other-base"), train, root / "foreign", steps=1),
        }
        yield {"root": root, "train": train, "reference": reference, **files}


@pytest.fixture
def cli_env(world, cli_store):
    """The CLI's store (``cli_store``) holding the base."""
    cli_store.put_model(BASE_NAME, world["base"])
    return cli_store


def everything(store) -> dict[str, str]:
    """Every object under the store's prefix, with its ETag."""
    return {info.key: info.etag for info in store.io.list(store.layout.prefix + "/")}


def import_args(world, name: str = "acme", **change) -> list[str]:
    given = {"--base-model": BASE_NAME, "--adapter": world["adapter"], "--data": world["train_file"],
             "--reference": world["reference_file"], **change}
    return ["tenants", "import", name, *[str(x) for pair in given.items() if pair[1] is not None for x in pair]]


# -- importing ---------------------------------------------------------------------------------


def test_import_makes_the_adapter_version_1_on_data_version_1_with_the_reference_flagged(world, cli_env, capsys):
    from cluster.tenant_inputs import retrain_recipe, split_records

    store = cli_env
    assert main(import_args(world)) == 0
    out = capsys.readouterr().out
    assert "tenant acme imported" in out and "adapter v000001, data d000001 (24 training + 16 reference" in out
    assert "exact-retrain fallback unavailable: imported without a training recipe" in out

    head, _ = store.get_head("acme")
    assert (head.adapter, head.data) == ("v000001", "d000001")
    assert store.list_adapter_versions("acme") == ["v000001"] and store.list_data_versions("acme") == ["d000001"]
    config = store.get_tenant("acme")
    assert (config.lora.rank, config.lora.alpha, config.lora.target_modules) == (4, 8, ["q_proj", "v_proj"])
    assert config.training.heldout_unit == "given" and config.training.reproducible is False
    manifest = store.get_adapter_manifest("acme", "v000001")
    assert manifest.path == "import" and manifest.data_version == "d000001" and manifest.parent_version is None
    evidence = manifest.checks["import"]
    assert evidence["adapter_loads"] and evidence["lora_tensors"] == 4 and evidence["records_encoded"] == 40
    assert 0 < evidence["first_record_loss"] < 20
    assert manifest.checks["retrain_fallback"] == "unavailable: imported without a training recipe"
    assert store.download_adapter("acme", "v000001").joinpath("adapter_model.safetensors").read_bytes() == \
        (world["adapter"] / "adapter_model.safetensors").read_bytes()

    dataset = store.read_dataset("acme", "d000001")
    assert [r.id for r in dataset if r.heldout] == [r.id for r in world["reference"]]
    assert [r.id for r in dataset if not r.heldout] == [r.id for r in world["train"]]
    train, heldout = split_records(config, dataset)  # what every erasure job on the tenant sees
    assert [r.id for r in train] == [r.id for r in world["train"]]
    assert [r.id for r in heldout] == [r.id for r in world["reference"]]
    assert heldout[0].messages() == [m.model_dump(exclude_none=True) for m in world["reference"][0].messages]
    assert retrain_recipe(config) is None

    assert main(["tenants", "show", "acme"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["training"]["reproducible"] is False and shown["head"]["adapter"] == "v000001"


def test_a_training_recipe_makes_the_retrain_fallback_available(world, cli_env, capsys, tmp_path):
    from cluster.tenant_inputs import retrain_recipe

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"epochs": 2, "lr": 0.01, "batch_size": 8, "seed": 3, "max_length": 96}))
    assert main(import_args(world, **{"--recipe": recipe}) + ["--issue-key"]) == 0
    out = capsys.readouterr().out
    assert "unavailable" not in out
    api_key = out.strip().splitlines()[-1].split(": ", 1)[1]
    assert cli_env.authenticate(api_key) == "acme"
    config = cli_env.get_tenant("acme")
    assert config.training.reproducible and config.training.max_length == 96
    trained_with = retrain_recipe(config)
    assert (trained_with.rank, trained_with.alpha, trained_with.target_modules) == (4, 8, ("q_proj", "v_proj"))
    assert (trained_with.epochs, trained_with.lr, trained_with.batch_size, trained_with.seed) == (2, 0.01, 8, 3)
    assert cli_env.get_adapter_manifest("acme", "v000001").checks["retrain_fallback"] == "available"


def bad_input(world, root: Path, case: str) -> tuple[dict, str]:
    """The arguments changed for ``case`` and the words its error must contain."""
    train, reference = world["train"], world["reference"]
    if case == "adapter made for another base":
        return {"--adapter": world["foreign"]}, "does not fit base model"
    if case == "DoRA adapter":
        return {"--adapter": world["dora"]}, "use_dora=True is not supported"
    if case == "corrupt weights":
        corrupt = root / "corrupt"
        shutil.copytree(world["adapter"], corrupt)
        (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
        return {"--adapter": corrupt}, "SafetensorError"
    if case == "no adapter there":
        return {"--adapter": root / "nowhere"}, "adapter config not found"
    if case == "unknown base model":
        return {"--base-model": "no-such-model"}, "no model 'no-such-model'"
    if case == "reference shares an id with the records":
        clash = Record(id=train[0].id, prompt="An unrelated question?", response="An unrelated answer.")
        return {"--reference": write_jsonl(root / "ref.jsonl", reference + [clash])}, f"['{train[0].id}']"
    if case == "reference repeats a training record's messages":
        copy = train[1].model_copy(update={"id": "copied"})
        return {"--reference": write_jsonl(root / "ref.jsonl", reference + [copy])}, f"'copied' = training '{train[1].id}'"
    if case == "empty reference":
        return {"--reference": write_jsonl(root / "ref.jsonl", [])}, "reference: no records"
    if case == "invalid record":
        lines = [r.model_dump(exclude_none=True) for r in train[:2]] + [{"id": "x", "messages": [
            {"role": "user", "content": "A question without an answer"}]}]
        return {"--data": write_jsonl(root / "train.jsonl", lines)}, "train.jsonl:3: "
    if case == "invalid reference record":
        lines = [r.model_dump(exclude_none=True) for r in reference[:1]] + [{"id": "y", "prompt": "only a prompt"}]
        return {"--reference": write_jsonl(root / "ref.jsonl", lines)}, "ref.jsonl:2: "
    if case == "partial training recipe":
        (root / "recipe.json").write_text(json.dumps({"epochs": 2, "lr": 0.01}))
        return {"--recipe": root / "recipe.json"}, "missing ['batch_size']"
    if case == "chat template that cannot render the records":
        (root / "recipe.json").write_text(json.dumps({"chat_template": "{{ raise_exception('no system turns') }}"}))
        return {"--recipe": root / "recipe.json"}, f"record '{train[0].id}': the chat template cannot render"
    raise AssertionError(case)


@pytest.mark.parametrize("case", [
    "adapter made for another base", "DoRA adapter", "corrupt weights", "no adapter there", "unknown base model",
    "reference shares an id with the records", "reference repeats a training record's messages", "empty reference",
    "invalid record", "invalid reference record", "partial training recipe",
    "chat template that cannot render the records",
])
def test_bad_input_is_one_clear_line_and_writes_nothing(world, cli_env, capsys, tmp_path, case):
    change, words = bad_input(world, tmp_path, case)
    before = everything(cli_env)
    capsys.readouterr()

    assert main(import_args(world, **change)) == 2

    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("eraser: error: ")]
    assert len(errors) == 1 and words in errors[0] and "Traceback" not in stderr, stderr
    assert everything(cli_env) == before
    assert not cli_env.tenant_exists("acme")


def test_an_existing_tenant_is_refused_and_left_as_it_was(world, cli_env, capsys):
    assert main(["tenants", "create", "acme", "--base-model", BASE_NAME]) == 0
    before = everything(cli_env)
    capsys.readouterr()
    assert main(import_args(world)) == 2
    assert "tenant 'acme' already exists" in capsys.readouterr().err
    assert everything(cli_env) == before


# -- erasures on an imported tenant ----------------------------------------------------------------


def subject_in_both(world) -> str:
    """A data subject with records the adapter trained on and records in the reference."""
    trained = {r.subject for r in world["train"]}
    return next(r.subject for r in world["reference"] if r.subject in trained)


def test_an_erasure_on_an_imported_tenant_publishes_erases_its_reference_records_and_says_no_retrain(world, cli_env):
    from cluster import CoordinatorOptions, LocalErasureService
    from tenants.models import ReceiptStatus

    store = cli_env
    assert main(import_args(world)) == 0
    subject = subject_in_both(world)
    erased = {r.id for r in world["train"] + world["reference"] if r.subject == subject}
    service = LocalErasureService(store.settings, options=CoordinatorOptions(pipeline=PIPELINE, purge_grace_seconds=0))
    service.submit({"request_id": "dsr-1", "tenant": "acme", "kind": "remove", "subjects": [subject]})

    assert [r["status"] for r in service.process(["acme"])["acme"]] == ["published"]

    receipt = store.get_receipt("acme", "dsr-1")
    assert receipt.status == ReceiptStatus.published and receipt.path == "influence"
    assert receipt.checks["retrain_fallback"] == "unavailable: imported without a training recipe"
    assert sorted(receipt.records_affected) == sorted(erased)
    head, _ = store.get_head("acme")
    assert (head.adapter, head.data) == ("v000002", "d000002")
    manifest = store.get_adapter_manifest("acme", "v000002")
    assert manifest.checks["retrain_fallback"] == receipt.checks["retrain_fallback"]
    assert manifest.arguments["heldout_records"] == len(world["reference"])
    after = store.read_dataset("acme", "d000002")
    assert erased.isdisjoint(r.id for r in after)
    assert {r.id for r in after if r.heldout} == {r.id for r in world["reference"]} - erased
    assert store.list_data_versions("acme") == ["d000002"]  # d000001 (and the reference in it) purged


@pytest.mark.parametrize("recipe", [None, {"epochs": 1, "lr": 0.01, "batch_size": 8}])
def test_when_no_candidate_passes_only_a_training_recipe_allows_the_retrain(world, cli_env, tmp_path, recipe):
    from cluster import CoordinatorOptions, LocalErasureService
    from tenants.models import ReceiptStatus

    store = cli_env
    if recipe is not None:
        (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    assert main(import_args(world, **{"--recipe": tmp_path / "recipe.json" if recipe else None})) == 0
    # a membership test so strict that no influence candidate passes it; a retrain is what comes next
    strict = replace(PIPELINE, verify=replace(PIPELINE.verify, alpha=0.999), remediate=False, retrain=True)
    service = LocalErasureService(store.settings, options=CoordinatorOptions(pipeline=strict, purge_grace_seconds=0))
    service.submit({"request_id": "dsr-1", "tenant": "acme", "kind": "remove", "subjects": [subject_in_both(world)]})
    service.process(["acme"])

    receipt = store.get_receipt("acme", "dsr-1")
    if recipe is None:
        assert receipt.status == ReceiptStatus.failed and "no retrain fallback" in receipt.error
        assert receipt.checks["retrain_fallback"] == "unavailable: imported without a training recipe"
        assert store.get_head("acme")[0].adapter == "v000001" and store.list_adapter_versions("acme") == ["v000001"]
    else:
        assert receipt.status == ReceiptStatus.published and receipt.path == "retrain", receipt.error
        assert "retrain_fallback" not in receipt.checks
        assert store.get_head("acme")[0].adapter == "v000002"
