"""`eraser model init | train | erase` end to end on a tiny Llama + LoRA, for every request kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli.main import main
from cli.synthetic import customer_records, generic_corpus
from eraser.metrics import nll_progress
from eraser.model import load_adapter, load_base, load_tokenizer
from eraser.records import load_records, mean_loss, save_records
from eraser.requests import EditRequest, apply_edits, build_edits
from eraser.update import read_manifest

TRAIN = ["--epochs", "3", "--lr", "1e-2", "--rank", "4", "--batch-size", "4", "--seed", "0", "--heldout-fraction", "0.3"]
DEBUG = False
BASE = ["--vocab-size", "320", "--hidden-size", "64", "--layers", "1", "--heads", "2"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A base pretrained on other customers' records, and an adapter trained on 8 customers' records."""
    root = tmp_path_factory.mktemp("erase-cli")
    records = customer_records(8, 3, seed=3)
    save_records(records, root / "records.jsonl")
    (root / "corpus.txt").write_text("\n".join(generic_corpus(records, documents=300)))
    assert main(["model", "init", "--out", str(root / "base"), "--corpus", str(root / "corpus.txt"), *BASE,
                 "--pretrain-corpus", str(root / "corpus.txt"), "--pretrain-steps", "300"]) == 0
    assert main(["train", "--base", str(root / "base"), "--data", str(root / "records.jsonl"),
                 "--out", str(root / "adapter"), *TRAIN]) == 0
    return root


def request_for(kind: str, records) -> dict:
    subject = records[6].subject
    chosen = [r for r in records if r.subject == subject]
    body = {"request_id": f"req-{kind}", "tenant": "acme", "kind": kind, "subjects": [subject]}
    if kind == "modify_query":
        body["replacements"] = {r.id: {"prompt": f"Tell me about customer {i}."} for i, r in enumerate(chosen)}
    if kind == "correct_response":
        body["replacements"] = {r.id: {"response": "That information is not available."} for r in chosen}
    return body


def losses(root: Path, adapter: str, records) -> float:
    model = load_adapter(load_base(root / "base"), root / adapter)
    return mean_loss(model, records, load_tokenizer(root / "base"))


# eigen refined by PCG at a fixed damping: the bare low-rank solution (the default) is only as good as the
# damping the verified path searches for it, tested below. eigen's relative damping scales the sampled
# curvature's top eigenvalue, which the label draws move: at 0.03 correct_response's retained records moved
# 0.21-0.43 of the bound's 0.25 over seeds (7 of 20 passed with torch.multinomial's draws, 3 of 20 with the
# device-independent ones); at 0.04 every kind passed at seeds 0-5 (retained at most 0.21, progress >= 0.24).
@pytest.mark.parametrize("solver, damping", [("cg", "0.1"), ("eigen", "0.04")])
@pytest.mark.parametrize("kind", ["remove", "modify_query", "correct_response"])
def test_every_kind_moves_the_adapter_towards_the_retrained_gold(workspace, kind, solver, damping, capsys):
    """Progress = how far the affected records' NLL moved from the original toward the gold's.

    This measures the influence update itself (``--no-verify``); the verified default path, which may
    remediate past it, is tested below. The damping is relative to each solver's top-eigenvalue estimate
    (power iteration on the batch for cg, the sampled low-rank curvature's for eigen, which runs higher)."""
    records = load_records(workspace / "records.jsonl")
    body = request_for(kind, records)
    (workspace / f"{kind}.json").write_text(json.dumps(body))
    edits = build_edits(EditRequest.from_json(body), records)
    edited = apply_edits(records, edits)
    save_records(edited, workspace / f"{kind}-edited.jsonl")
    if not (workspace / f"gold-{kind}").exists():
        assert main(["train", "--base", str(workspace / "base"), "--data", str(workspace / f"{kind}-edited.jsonl"),
                     "--out", str(workspace / f"gold-{kind}"), *TRAIN]) == 0
    erased = f"erased-{kind}-{solver}"
    assert main(["erase", "--base", str(workspace / "base"), "--adapter", str(workspace / "adapter"),
                 "--data", str(workspace / "records.jsonl"), "--request", str(workspace / f"{kind}.json"),
                 "--out", str(workspace / erased), "--solver", solver, "--damping", damping, "--no-verify",
                 *(["--max-iters", "30"] if solver == "eigen" else [])]) == 0
    out = capsys.readouterr().out
    assert "residual" in out and "verified    NO" in out

    manifest = read_manifest(workspace / erased)
    solved = manifest["solver"]["converged"] or manifest["solver"]["extra"].get("lowrank_exact")
    assert manifest["request_ids"] == [f"req-{kind}"] and solved
    assert manifest["path"] == "influence" and manifest["verified"] is False
    # Records of the held-out split were never trained on: named, reported apart, not in the update.
    assert sorted(manifest["records_affected"] + manifest["heldout"]["affected"]) == sorted(edit.old.id for edit in edits)
    for label, affected in (("old", [e.old for e in edits]), ("new", [e.new for e in edits if e.new])):
        if not affected:
            continue
        before, after, gold = (losses(workspace, name, affected) for name in ("adapter", erased, f"gold-{kind}"))
        progress = nll_progress(before, after, gold)
        print(f"{kind} ({solver}) {label} records: NLL {before:.3f} -> {after:.3f} (gold {gold:.3f}), progress {progress:.2f}")
        assert DEBUG or 0.2 < progress < 3.0, f"{kind}: {label} records' NLL did not move toward the gold's"
    retained = [r for r in edited if r.id not in {e.old.id for e in edits}]
    before, after, gold = (losses(workspace, name, retained) for name in ("adapter", erased, f"gold-{kind}"))
    assert abs(after - before) < 0.25 * max(before, gold), "retained records' NLL moved too much"


def run_erase(workspace: Path, body, out: str, *extra: str) -> int:
    path = workspace / f"{out}.json"
    path.write_text(json.dumps(body) if not isinstance(body, str) else body)
    return main(["erase", "--base", str(workspace / "base"), "--adapter", str(workspace / "adapter"),
                 "--data", str(workspace / "records.jsonl"), "--request", str(path),
                 "--out", str(workspace / out), *extra])


@pytest.mark.parametrize(
    "body, message",
    [
        ({"request_id": "x", "kind": "remove", "records": ["nope"]}, "unknown record id"),
        ({"request_id": "x", "kind": "remove", "subjects": ["Nobody"]}, "no records about subject"),
        ({"request_id": "x", "kind": "remove", "records": []}, "exactly one of"),
        ({"request_id": "x", "kind": "modify_query", "records": ["rec-0000-0"]}, "needs replacements"),
        ({"request_id": "x", "kind": "correct_response", "records": ["rec-0000-0"],
          "replacements": {"rec-0000-0": {"prompt": "wrong field"}}}, "needs replacements"),
        ({"request_id": "x", "kind": "remove", "records": ["rec-0000-0"],
          "replacements": {"rec-0000-0": {"response": "x"}}}, "not allowed"),
        ({"request_id": "x", "kind": "forget", "records": ["rec-0000-0"]}, "kind must be one of"),
        ("{not json", "Expecting"),
    ],
)
def test_bad_requests_fail_clearly_and_write_nothing(workspace, body, message, capsys):
    assert run_erase(workspace, body, "bad") == 2
    assert message in capsys.readouterr().err
    assert not (workspace / "bad").exists()


def test_mismatched_base_and_adapter_is_refused(workspace, tmp_path, capsys):
    assert main(["model", "init", "--out", str(tmp_path / "other"), "--corpus", str(workspace / "records.jsonl"),
                 "--vocab-size", "320", "--hidden-size", "96", "--layers", "1", "--heads", "3"]) == 0
    body = {"request_id": "x", "kind": "remove", "records": ["rec-0000-0"]}
    (tmp_path / "r.json").write_text(json.dumps(body))
    code = main(["erase", "--base", str(tmp_path / "other"), "--adapter", str(workspace / "adapter"),
                 "--data", str(workspace / "records.jsonl"), "--request", str(tmp_path / "r.json"),
                 "--out", str(tmp_path / "out")])
    assert code == 2 and "does not fit base model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unconverged_and_diverged_solves_write_nothing(workspace, capsys):
    """Every escalated damping fails too; without the retrain fallback no adapter may be written."""
    body = {"request_id": "x", "kind": "remove", "records": ["rec-0000-0"]}
    assert run_erase(workspace, body, "unconverged", "--solver", "cg", "--max-iters", "1", "--tol", "1e-9",
                     "--no-retrain") == 2
    assert "above tol" in capsys.readouterr().err
    assert not (workspace / "unconverged").exists()
    assert run_erase(workspace, body, "diverged", "--solver", "cg", "--curvature", "hessian", "--damping", "1e-9",
                     "--max-iters", "200", "--tol", "1e-12", "--no-retrain") == 2
    err = capsys.readouterr().err
    assert "non-positive curvature" in err or "residual grew" in err or "above tol" in err
    assert not (workspace / "diverged").exists()


def test_the_default_erase_is_verified_and_says_which_path(workspace, capsys):
    """`eraser erase` runs verified_erase: influence -> membership test -> remediation/retrain -> guard,
    printing and recording the path, the test before/after, retained NLL before/after, time per stage."""
    records = load_records(workspace / "records.jsonl")
    from eraser.reference import split_heldout

    _, heldout = split_heldout(records, 0.3, 0)
    single = next(r for r in heldout if sum(h.subject == r.subject for h in heldout) == 1)  # a held-out record
    body = [request_for("remove", records), {"request_id": "one-record", "kind": "remove", "records": [single.id]}]
    assert run_erase(workspace, body, "verified", "--verify-original") == 0
    out = capsys.readouterr().out
    for line in ("path ", "test before ", "damping     searched", "reference ", "retained    NLL",
                 "stages ", "written"):
        assert line in out, out
    manifest = read_manifest(workspace / "verified")
    assert manifest["path"] in ("influence", "influence+remediation", "retrain") and manifest["verified"] is True
    if manifest["path"] != "retrain":  # the retrain is published on its own authority, its test reported
        assert manifest["verification"]["after"]["passed"]
        assert manifest["retained"]["after"] <= manifest["retained"]["bound"]
    assert manifest["verification"]["before"] is not None  # --verify-original: the original tested too
    assert all(manifest["guard"].values()) and manifest["heldout"]["fraction"] == 0.3
    assert manifest["heldout"]["unit"] == "mixed" and manifest["damping_search"]["damping"] > 0
    assert manifest["heldout"]["affected"] == [single.id]  # held out: named, never trained on
    assert {"influence_s", "verify_s", "guard_s", "total_s"} <= set(manifest["stages"])
    assert manifest["recipe"]["epochs"] == 3  # the retrain fallback's recipe travels with the adapter


def test_without_a_held_out_split_erase_refuses_unless_told(workspace, tmp_path, capsys):
    records = load_records(workspace / "records.jsonl")
    assert main(["train", "--base", str(workspace / "base"), "--data", str(workspace / "records.jsonl"),
                 "--out", str(tmp_path / "all"), *TRAIN, "--heldout-fraction", "0"]) == 0
    (tmp_path / "r.json").write_text(json.dumps(request_for("remove", records)))
    common = ["erase", "--base", str(workspace / "base"), "--adapter", str(tmp_path / "all"),
              "--data", str(workspace / "records.jsonl"), "--request", str(tmp_path / "r.json")]
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "refused")]) == 2
    assert "could not verify" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    assert main([*common, "--out", str(tmp_path / "unverified"), "--allow-unverified"]) == 0
    assert "UNVERIFIED" in capsys.readouterr().out
    manifest = read_manifest(tmp_path / "unverified")
    assert manifest["verified"] is False and manifest["path"] == "influence"


def test_a_bfloat16_erase_lands_within_a_tenth_of_a_nat_of_the_float32_one(workspace, capsys):
    """`eraser erase --dtype bfloat16` (the base's weights in bfloat16; LoRA factors, gradients, curvature and
    solver vectors float32) runs the verified path and leaves the erased records' NLL within 0.1 nats of
    the float32 run's, both adapters scored in float32."""
    records = load_records(workspace / "records.jsonl")
    body = request_for("remove", records)
    erased = [r for r in records if r.subject == body["subjects"][0]]
    tokenizer = load_tokenizer(workspace / "base")
    nll = {}
    for dtype in ("float32", "bfloat16"):
        assert run_erase(workspace, body, f"precision-{dtype}", "--dtype", dtype, "--device", "cpu") == 0
        manifest = read_manifest(workspace / f"precision-{dtype}")
        assert manifest["precision"] == {"device": "cpu", "dtype": dtype} and manifest["verified"] is True
        model = load_adapter(load_base(workspace / "base"), workspace / f"precision-{dtype}")
        nll[dtype] = mean_loss(model, erased, tokenizer)
    print(f"erased NLL: float32 {nll['float32']:.4f}, bfloat16 {nll['bfloat16']:.4f}")
    assert abs(nll["bfloat16"] - nll["float32"]) <= 0.1, nll


def test_train_in_bfloat16_and_refuse_a_device_by_name(workspace, tmp_path, capsys):
    assert main(["train", "--base", str(workspace / "base"), "--data", str(workspace / "records.jsonl"),
                 "--out", str(tmp_path / "bf16"), *TRAIN, "--epochs", "1", "--dtype", "bfloat16"]) == 0
    assert read_manifest(tmp_path / "bf16")["precision"] == {"device": "cpu", "dtype": "bfloat16"}
    model = load_adapter(load_base(workspace / "base", dtype=torch.bfloat16), tmp_path / "bf16")
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    capsys.readouterr()
    for device, message in (("gpu", "device must be"), ("cuda:7", "CUDA")):
        if device.startswith("cuda") and torch.cuda.device_count() > 7:
            continue
        assert run_erase(workspace, request_for("remove", load_records(workspace / "records.jsonl")),
                         f"refused-{device}", "--device", device) == 2
        assert message in capsys.readouterr().err and not (workspace / f"refused-{device}").exists()
