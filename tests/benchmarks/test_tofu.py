"""The TOFU benchmark in a tiny configuration: the machinery runs and the metrics mean what they say.

Numbers of a tiny model are meaningless; what is checked is that the metrics are computed correctly
(the gold against itself: forget quality 1, KL 0, distance 0; the original: distance 1) and that the
outputs are written. Timings are never asserted.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from benchmarks.tofu_data import FORGET_SPLITS, RequestSpec, default_tofu_dir, load_tofu, tenant_authors

pytestmark = pytest.mark.skipif(
    not (default_tofu_dir() / "forget10.json").is_file(),
    reason=f"TOFU data not found at {default_tofu_dir()} (expected ../shared/data/tofu; set TOFU_DIR)",
)


@pytest.fixture(scope="module")
def tofu():
    return load_tofu()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from benchmarks.tofu import PRESETS, Options, run

    root = tmp_path_factory.mktemp("tofu-bench")
    options = Options(**{**PRESETS["tiny"], "out": str(root / "out"), "cache_dir": str(root / "cache"),
                         "methods": ("original", "gold", "ours", "ours-verified", "paper-code", "ga")})
    return run(options, ["test"]), root / "out"


def rows_by_method(document):
    return {row["method"]: row for row in document["rows"]}


def test_tofu_rows_requests_and_tenants(tofu):
    assert len(tofu) == 4000 and tofu[3999].author == 199 and tofu[20].author == 1
    assert all(row.perturbed_answers and row.paraphrased_question for row in tofu if row.author >= 180)
    assert set(FORGET_SPLITS["forget05"]) <= set(tenant_authors(10))
    records = [row.record() for row in tofu if row.author in tenant_authors(3)]
    from eraser.requests import build_edits

    for kind in ("remove", "correct_response", "modify_query"):
        spec = RequestSpec.parse(f"{kind}:forget01")
        edits = build_edits(spec.edit_request(tofu), records)
        assert len(edits) == 40 and {e.old.subject for e in edits} == {"author-198", "author-199"}
        if kind == "correct_response":
            assert edits[0].new.response == tofu[3960].perturbed_answers[0]
        if kind == "modify_query":
            assert edits[0].new.prompt == tofu[3960].paraphrased_question
    assert RequestSpec.parse("remove:5,7").authors == (5, 7)
    with pytest.raises(ValueError, match="kind"):
        RequestSpec.parse("forget:forget01")


def test_gold_against_itself_and_the_original(tiny_run):
    document, _ = tiny_run
    rows = rows_by_method(document)
    gold, original = rows["gold"]["metrics"], rows["original"]["metrics"]
    assert gold["forget_quality"] == 1.0
    assert gold["distance"] == 0.0 and gold["kl_forget"] == 0.0 and gold["kl_retained"] == 0.0
    assert original["distance"] == pytest.approx(1.0, abs=1e-12)
    assert original["kl_forget"] > 0 and original["kl_retained"] > 0
    assert rows["gold"]["gold"] == gold  # every row carries the gold's metrics it is compared with
    for row in document["rows"]:
        assert row["error"] is None, row["error"]
        assert 0.0 <= row["metrics"]["forget_quality"] <= 1.0
        assert all(math.isfinite(row["metrics"][k]) for k in ("nll_forget", "nll_retained", "kl_forget", "distance"))
    ours = rows["ours"]
    assert ours["info"]["solver"]["solver"] == "eigen" and ours["info"]["cache_build_s"] >= 0
    assert ours["speedup"] is not None and ours["peak_rss_mb"] > 0


def test_outputs_are_written(tiny_run):
    document, out = tiny_run
    saved = json.loads((out / "results.json").read_text())
    assert saved["command"] == "test" and saved["versions"]["torch"] and len(saved["rows"]) == 6
    assert {"requests", "scaling"} <= set(saved["summary"])
    table = (out / "results.md").read_text()
    assert "| gold |" in table and "## Targets" in table
    assert (out / "fidelity.png").stat().st_size > 0 and (out / "scaling.png").stat().st_size > 0
    from benchmarks.report import compact

    lines = compact(saved).splitlines()
    assert len(lines) == 2 + 6 and "| remove:forget01 (60) | gold | 1.000 |" in compact(saved)


def test_ours_damping_grows_with_the_edited_fraction(tiny_run):
    """The rule of benchmarks/README.md: the damping at the reference fraction, (f / ref) ** exponent away from
    it, constant with exponent 0; and the tiny run's ``ours`` used it for its request."""
    from dataclasses import replace

    from benchmarks.tofu import Options, Runner

    runner = Runner(Options(damping=0.01, damping_reference_fraction=0.05, damping_fraction_exponent=0.5), ["test"])
    assert runner.ours_damping(0.05) == pytest.approx(0.01)
    assert runner.ours_damping(0.2) == pytest.approx(0.02)
    runner.options = replace(runner.options, damping_fraction_exponent=0.0)
    assert runner.ours_damping(0.2) == pytest.approx(0.01)
    document, _ = tiny_run
    ours = rows_by_method(document)["ours"]
    fraction = ours["forgotten_records"] / ours["records"]
    options = Options(**{k: v for k, v in document["options"].items() if k in Options.__dataclass_fields__
                         and not isinstance(v, list)})
    assert ours["info"]["config"]["damping"] == pytest.approx(Runner(options).ours_damping(fraction))


def test_truth_ratio_and_forget_quality_by_hand(tofu, tiny_run):
    from benchmarks.tofu_metrics import forget_quality, rouge_l, truth_ratios

    class Constant:
        """A 'model' whose every next-token distribution is uniform over the vocabulary."""

        def __init__(self, vocab):
            self.vocab = vocab

        def __call__(self, input_ids, attention_mask):
            import torch

            class Out:
                logits = torch.zeros(*input_ids.shape, self.vocab)
            return Out()

    from eraser.model import train_tokenizer

    tokenizer = train_tokenizer([r.question + " " + r.answer for r in tofu[:200]], vocab_size=300)
    row = tofu[3999]
    ratios = truth_ratios(Constant(len(tokenizer)), tokenizer, [row, tofu[0]])  # retain rows have no fields
    # uniform: per-token probability 1/V for every answer, so the ratio is exactly 1
    assert ratios.shape == (1,) and ratios[0] == pytest.approx(1.0)
    sample = np.array([0.3, 0.5, 0.9, 1.2])
    assert forget_quality(sample, sample) == 1.0
    assert forget_quality(sample, sample + 10) < 0.05
    assert rouge_l(["the cat sat"], ["the cat sat"]) == 1.0 and rouge_l(["dog"], ["the cat sat"]) == 0.0


def test_paper_code_baseline_keeps_its_constant_init(tiny_run, tofu):
    """The public code adds x_init to every weight; with zero Adam steps that is all it does."""
    import torch

    from benchmarks.baselines import paper_code_update
    from benchmarks.tofu_setup import Workbench
    from eraser.requests import build_edits
    from eraser.update import lora_vector

    document, out = tiny_run
    from pathlib import Path

    cache = Path(document["options"]["cache_dir"])
    base = next(cache.glob("base-*"))
    from benchmarks.tofu import PRESETS
    from eraser.training import TrainConfig

    recipe = TrainConfig(rank=PRESETS["tiny"]["lora_rank"], alpha=2.0 * PRESETS["tiny"]["lora_rank"], epochs=1)
    bench = Workbench(base, recipe, cache)
    model = bench.peft_model()
    records = [row.record() for row in tofu if row.author in tenant_authors(3)]
    edits = build_edits(RequestSpec.parse("remove:forget01").edit_request(tofu), records)
    theta = lora_vector(model)
    result = paper_code_update(model, bench.tokenizer, records, edits, iters=0, x_init=1e-3)
    assert torch.allclose(result.theta - theta, torch.full_like(theta, 1e-3))
    assert result.info["b_norm"] > 0


def test_summary_judges_targets_and_rivals():
    from benchmarks.report import summarize

    def row(method, nll_forget, distance, fq=0.5, speedup=20.0):
        metrics = {"forget_quality": fq, "nll_forget": nll_forget, "nll_forget_new": None, "nll_retained": 2.0,
                   "rouge_retained": 0.4, "kl_forget": distance / 10, "kl_retained": 0.001, "distance": distance}
        gold = dict(metrics, forget_quality=1.0, nll_forget=3.0, distance=0.0, kl_forget=0.0, kl_retained=0.0)
        return {"authors": 40, "records": 800, "request": "remove:forget01", "method": method, "metrics": metrics,
                "gold": gold, "speedup": speedup, "speedup_cpu": speedup, "retrain_time_s": 10.0,
                "wall_time_s": 0.5, "info": {"cache_build_s": 1.0}, "error": None}

    document = {"targets": {"forget_quality_min": 0.05, "nll_forget_rel_max": 0.1, "nll_retained_rel_max": 0.02,
                            "speedup_min": 10.0},
                "options": {"authors": 40, "scaling_request": "remove:forget01"},
                "rows": [row("ours-verified", 2.9, 0.3), row("paper-code", 2.0, 1.0), row("ga", 2.95, 0.2)]}
    summary = summarize(document)["requests"]["40:remove:forget01"]
    assert summary["nll_forget_ok"] and summary["forget_quality_ok"] and summary["nll_retained_ok"]
    assert summary["beats"]["paper-code"]["all"] is True
    assert summary["beats"]["ga"]["all"] is False and set(summary["beats"]["ga"]["lost_on"]) == {
        "nll_forget", "kl_forget", "distance"}


def test_a_failed_method_carries_no_fidelity_numbers_and_shows_as_failed(tiny_run):
    """A method that raised published nothing: its row must not carry the original's or the gold's metrics
    (issue 12 found failed rows showing forget quality 1 and distance 0), and every table says FAILED."""
    from benchmarks.report import compact, markdown, summarize

    document, _ = tiny_run
    failed = dict(rows_by_method(document)["ours-verified"], metrics=None, error="VerificationFailedError: x",
                  speedup=None, speedup_cpu=None)
    broken = dict(document, rows=[r for r in document["rows"] if r["method"] != "ours-verified"] + [failed])
    summary = summarize(broken)
    assert summary["requests"]["3:remove:forget01"] == {"failed": "VerificationFailedError: x"}
    broken["summary"] = summary
    assert "| ours-verified | FAILED |" in markdown(broken) and "| ours-verified | FAILED |" in compact(broken)
    verified = rows_by_method(document)["ours-verified"]
    assert verified["info"]["path"] in ("influence", "influence+remediation", "retrain")
    assert set(verified["info"]["stages"]) >= {"influence_s", "verify_s", "total_s"}


def test_bench_command_is_registered(capsys):
    from cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "tofu", "--help"])
    assert exit_info.value.code == 0
    assert "--authors" in capsys.readouterr().out
