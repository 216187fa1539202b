"""Every supported architecture, as a platform would bring it: a base built from the architecture's
config under a ChatML template, an adapter trained by plain PEFT code (assistant-only loss) on a subset
of the architecture's layers, ``eraser tenants import``; then an erasure through the coordinator
publishes a verified adapter version that moved the erased customer's records.

The base, the records and the plain PEFT loop are ``tests/eraser/test_architectures``'s; the records
are the chat-form support tenant of ``cli.synthetic`` (a system message, a question, an answer).
"""

from __future__ import annotations

import logging

import pytest
import torch

from cli.main import main
from cli.synthetic import customer_records
from eraser.bases import ARCHITECTURES, CHATML_GENERATION_TEMPLATE, chatml_tokenizer
from tests.cli.test_tenants_import import one_torch_thread, split, write_jsonl
from tests.eraser.test_architectures import SUBSETS, save_base, train_peft_adapter

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with one_torch_thread():
        root = tmp_path_factory.mktemp("architectures-import")
        records = customer_records(10, 4, seed=5, id_prefix="acme", chat=True)
        tokenizer = chatml_tokenizer([content for r in records for _, content in r.messages()], vocab_size=320,
                                     chat_template=CHATML_GENERATION_TEMPLATE)
        train, reference = split(records)
        yield {"root": root, "tokenizer": tokenizer, "train": train, "reference": reference,
               "train_file": write_jsonl(root / "train.jsonl", [r.to_json() for r in train]),
               "reference_file": write_jsonl(root / "reference.jsonl", [r.to_json() for r in reference])}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_an_imported_plain_peft_adapter_of_each_architecture_gets_a_verified_erasure(architecture, world, cli_store,
                                                                                     tmp_path):
    store = cli_store
    from cluster import CoordinatorOptions, LocalErasureService
    from eraser.model import load_adapter, load_base, load_tokenizer
    from eraser.records import collate, record_losses
    from tenants.models import ReceiptStatus
    from tests.cluster.helpers import PIPELINE

    base = save_base(architecture, world["tokenizer"], tmp_path / "base")
    train_peft_adapter(base, world["tokenizer"], world["train"], tmp_path / "adapter", SUBSETS[architecture],
                       steps=3 * len(world["train"]), lr=1e-2, r=8, lora_alpha=16)
    store.put_model(architecture, base)
    assert main(["tenants", "import", "acme", "--base-model", architecture, "--adapter", str(tmp_path / "adapter"),
                 "--data", str(world["train_file"]), "--reference", str(world["reference_file"])]) == 0

    subject = world["train"][0].subject
    erased = [r for r in world["train"] if r.subject == subject]
    service = LocalErasureService(store.settings, options=CoordinatorOptions(pipeline=PIPELINE, purge_grace_seconds=0))
    service.submit({"request_id": "dsr-1", "tenant": "acme", "kind": "remove", "subjects": [subject]})
    service.process(["acme"])

    receipt = store.get_receipt("acme", "dsr-1")
    assert receipt.status == ReceiptStatus.published, receipt.error
    assert receipt.path in ("influence", "influence+remediation"), receipt.path  # a verified update, not a retrain
    assert store.get_head("acme")[0].adapter == "v000002"
    tokenizer = load_tokenizer(base)
    batch = collate(erased, tokenizer)
    with torch.no_grad():
        before = record_losses(load_adapter(load_base(base), tmp_path / "adapter"), batch).mean()
        after = record_losses(load_adapter(load_base(base), store.download_adapter("acme", "v000002")), batch).mean()
    logger.info("%s: path %s, erased records' NLL %.3f -> %.3f", architecture, receipt.path, before, after)
    assert float(after) > float(before) + 0.01, (float(before), float(after))  # the erased records were unlearned
