"""The chat-tenant TOFU benchmark (issue 13) in a tiny configuration: the machinery runs end to end (a
qwen2 base with a ChatML tokenizer, a plain-PEFT adapter imported by the service, verified_erase, the
plain-PEFT retrain) and the JSON says what it should. The numbers of a tiny model are not checked; the
equality of the method's loss and the plain-PEFT training loss is.
"""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.tofu_data import default_tofu_dir

pytestmark = pytest.mark.skipif(
    not (default_tofu_dir() / "forget10.json").is_file(),
    reason=f"TOFU data not found at {default_tofu_dir()} (expected ../shared/data/tofu; set TOFU_DIR)",
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from benchmarks.tofu_chat import PRESETS, Options, run

    root = tmp_path_factory.mktemp("tofu-chat")
    options = Options(**{**PRESETS["tiny"], "tenant_authors": 3, "unseen_authors": 2, "out": str(root / "out"),
                         "cache_dir": str(root / "cache")})
    return run(options, ["test"]), root


def test_json_has_the_fields(tiny_run):
    document, root = tiny_run
    on_disk = json.loads((root / "out" / "results.json").read_text())
    assert on_disk["benchmark"] == "tofu_chat" and on_disk["command"] == "test"
    for key in ("options", "versions", "base", "tenant", "adapter_recipe", "adapter_training", "loss_check",
                "learning", "cache_build", "pairs", "elapsed_s", "targets"):
        assert key in on_disk, key
    assert on_disk["adapter_recipe"]["target_modules"] == ["q_proj", "v_proj"]
    assert on_disk["base"]["recipe"]["architecture"] == "qwen2"
    assert len(on_disk["pairs"]) == 1
    pair = on_disk["pairs"][0]
    for key in ("pair", "nll", "progress", "retained_diff", "retained_bound", "targets_met", "path", "verified",
                "erasure", "retrain", "speedup_wall", "speedup_cpu", "speedup_cpu_incl_cache_build", "outcome", "gold_verification",
                "erased_minus_retrain"):
        assert key in pair, key
    for model in ("original", "erased", "retrain"):
        assert all(math.isfinite(pair["nll"][model][group]) for group in ("erased", "retained", "unseen_reference"))
    assert pair["records_removed"] == 40 and pair["records_trained_removed"] == 36  # 2 authors, 2 rows held out each
    assert pair["path"] in ("influence", "influence+remediation") or pair["error"]
    assert pair["path"] != "retrain"  # recipe=None: the imported adapter has no retrain fallback
    assert isinstance(pair["gold_verification"]["passed"], bool)
    assert pair["erasure"]["wall_time_s"] > 0 and pair["retrain"]["wall_time_s"] > 0
    assert not list((root / "cache").glob("run-*"))  # the run's saved adapter is removed


def test_method_loss_equals_the_plain_peft_loss(tiny_run):
    document, _ = tiny_run
    check = document["loss_check"]
    assert check["passed"] and check["max_abs_diff"] <= 1e-5
    assert len(check["method"]) == len(check["plain_peft"]) == len(check["records"]) >= 2
    assert not check["method_template_has_generation_markers"]  # the base's own ChatML template: no markers


def test_base_is_cached(tiny_run, tmp_path):
    from benchmarks.tofu_chat import PRESETS, Options, Runner
    from benchmarks.tofu_data import load_tofu

    document, root = tiny_run
    options = Options(**{**PRESETS["tiny"], "tenant_authors": 3, "unseen_authors": 2, "out": str(tmp_path),
                         "cache_dir": str(root / "cache")})
    base_dir, info = Runner(options).ensure_base(load_tofu())
    assert info["cached"] and str(base_dir) == document["base"]["dir"]
