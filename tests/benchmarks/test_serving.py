"""The serving benchmark's pure parts: the grid, the tenant draws, the summary math, the targets, the CLI.

Nothing here starts Ray, vLLM or S3 (the benchmark itself does: ``python -m benchmarks.serving``).
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from benchmarks.serving import (
    PRESETS,
    Options,
    Point,
    Sample,
    TenantPicker,
    aggregate,
    check_targets,
    grid,
    options_from,
    parse_args,
    percentile,
    stale_answers,
    summarize,
    table,
    zipf_weights,
)

ROOT = Path(__file__).resolve().parents[2]


def test_grid_orders_by_replicas_and_draws_popularity_only_where_it_matters():
    points = grid([8, 0, 1, 64], ["zipf", "uniform"], [2, 1])
    assert points[:5] == [Point(1, 0, "-"), Point(1, 1, "-"), Point(1, 8, "uniform"), Point(1, 8, "zipf"),
                          Point(1, 64, "uniform")]
    assert len(points) == 2 * (2 + 2 * 2)
    assert [p.replicas for p in points] == sorted(p.replicas for p in points)
    assert grid([1, 8], ["zipf"], [1]) == [Point(1, 1, "-"), Point(1, 8, "zipf")]


def test_full_preset_is_the_issue_grid():
    points = grid(PRESETS["full"]["adapters"], PRESETS["full"]["popularity"], PRESETS["full"]["replicas"])
    assert {p.adapters for p in points} == {0, 1, 8, 64, 256}
    assert {p.replicas for p in points} == {1, 2}
    assert {p.popularity for p in points} == {"-", "uniform", "zipf"}


def test_zipf_weights_follow_the_power_law():
    weights = zipf_weights(64, 1.1)
    assert math.isclose(sum(weights), 1.0)
    assert all(a > b for a, b in zip(weights, weights[1:]))
    assert math.isclose(weights[0] / weights[9], 10 ** 1.1)


def test_picker_is_seeded_and_draws_the_right_shapes():
    n, draws = 16, 40_000
    picker, again = TenantPicker(n, "zipf", seed=3), TenantPicker(n, "zipf", seed=3)
    assert [picker.draw() for _ in range(100)] == [again.draw() for _ in range(100)]

    zipf = TenantPicker(n, "zipf", seed=1)
    counts = Counter(zipf.draw() for _ in range(draws))
    expected = zipf_weights(n)
    assert set(counts) <= set(range(n))
    for k in (0, 1, 4):
        assert abs(counts[k] / draws - expected[k]) < 0.01, (k, counts[k] / draws, expected[k])
    flat = TenantPicker(n, "uniform", seed=1)
    uniform = Counter(flat.draw() for _ in range(draws))
    assert set(uniform) == set(range(n))
    assert max(uniform.values()) / min(uniform.values()) < 1.2
    single = TenantPicker(1, "zipf", seed=0)
    assert {single.draw() for _ in range(10)} == {0}
    with pytest.raises(ValueError):
        TenantPicker(0, "uniform", seed=0)
    with pytest.raises(ValueError):
        TenantPicker(4, "pareto", seed=0)


@pytest.mark.parametrize("q", [0, 1, 50, 90, 99, 100])
def test_percentile_equals_numpy(q):
    values = [0.3, 0.1, 0.7, 0.2, 0.9, 0.45, 0.05]
    assert math.isclose(percentile(values, q), float(np.percentile(values, q)))
    assert math.isnan(percentile([], q))


def test_summary_counts_only_the_window():
    samples = [
        Sample(0.0, 0.5, "a", True, 16),  # ends before the window
        Sample(0.8, 1.2, "a", True, 16),
        Sample(1.0, 1.5, "b", True, 16),
        Sample(1.5, 2.5, "b", False, error="APIError: 503"),
        Sample(2.0, 2.9, "c", True, 8),
        Sample(2.5, 3.5, "c", True, 16),  # ends after
    ]
    s = summarize(samples, 1.0, 3.0)
    assert (s["requests"], s["failures"], s["tenants_seen"]) == (3, 1, 3)
    assert math.isclose(s["requests_per_s"], 1.5)
    assert math.isclose(s["tokens_per_s"], 20.0)
    assert math.isclose(s["p50_s"], 0.5)
    assert math.isclose(s["p99_s"], percentile([0.4, 0.5, 0.9], 99))
    assert s["errors"] == ["APIError: 503"]


def test_stale_answers_are_old_versions_after_the_switch_was_done():
    switches = [{"tenant": "t000", "version": "v000002", "done_at": 10.0}]
    samples = [
        Sample(9.0, 9.5, "t000", True, adapter="t000@v000001"),  # before: fine
        Sample(10.5, 11.0, "t000", True, adapter="t000@v000002"),
        Sample(11.0, 11.5, "t000", True, adapter="t000@v000001"),  # stale
        Sample(11.0, 11.5, "t001", True, adapter="t001@v000001"),  # another tenant
    ]
    assert stale_answers(samples, switches) == 1


def row(replicas, adapters, popularity, rps):
    return {"replicas": replicas, "adapters": adapters, "popularity": popularity, "requests_per_s": rps,
            "tokens_per_s": 16 * rps, "p50_s": 0.1, "p99_s": 0.2, "failures": 0, "prewarm_s": 1.0}


def test_targets_and_table():
    rows = [row(1, 0, "-", 12.0), row(1, 1, "-", 10.0), row(1, 64, "uniform", 8.5), row(1, 64, "zipf", 7.0)]
    runs = [{"replicas": 1, "load": {"failures": 0},
             "switches": [{"every_replica_serving_s": 0.4, "complete": True},
                          {"every_replica_serving_s": 1.2, "complete": True}]}]
    found = check_targets(rows, runs)
    assert found["64 adapters (uniform, 1 replica(s)) vs 1"]["met"] is True
    assert found["64 adapters (zipf, 1 replica(s)) vs 1"]["met"] is False
    assert found["failed requests during switches (1 replica(s))"]["met"] is True
    slowest = found["HEAD move to every replica serving, slowest (1 replica(s))"]
    assert (slowest["value"], slowest["met"]) == (1.2, True)
    text = table(rows)
    assert "| 1 | 64 adapters | zipf | 7.0 | 112 |" in text and "| 0.70 |" in text


def test_options_from_preset_and_command_line():
    quick = options_from(parse_args(["--preset", "quick"]))
    assert quick.adapters == PRESETS["quick"]["adapters"] and quick.replicas == (1,)
    custom = options_from(parse_args(["--preset", "quick", "--adapters", "0", "64", "--replicas", "1", "2",
                                      "--duration-s", "2"]))
    assert (custom.adapters, custom.replicas, custom.duration_s) == ((0, 64), (1, 2), 2.0)
    assert custom.concurrency == PRESETS["quick"]["concurrency"]
    with pytest.raises(ValueError, match="max_cpu_loras"):
        Options(max_loras=8, max_cpu_loras=4)
    with pytest.raises(ValueError, match="popularity"):
        Options(popularity=("pareto",))


def test_help_runs():
    done = subprocess.run([sys.executable, "-m", "benchmarks.serving", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--preset" in done.stdout and "--adapters" in done.stdout


def test_aggregate_takes_medians_over_repeats():
    runs = [{**row(1, 8, "zipf", rps), "requests": 100, "failures": f, "load_average_after": (load, 0, 0)}
            for rps, f, load in [(10.0, 0, 3.0), (14.0, 1, 5.0), (12.0, 0, 4.0)]]
    runs.append({**row(1, 1, "-", 20.0), "requests": 50, "failures": 0, "load_average_after": (2.0, 0, 0)})
    rows = aggregate(runs)
    assert [(r["adapters"], r["repeats"]) for r in rows] == [(1, 1), (8, 3)]
    eight = rows[1]
    assert (eight["requests_per_s"], eight["requests_per_s_min"], eight["requests_per_s_max"]) == (12.0, 10.0, 14.0)
    assert (eight["requests"], eight["failures"], eight["load_average_1m"]) == (300, 1, [3.0, 5.0, 4.0])
    assert "| 1 | 8 adapters | zipf | 12.0 (10.0-14.0) |" in table(rows)


def test_the_64_adapter_ratio_within_each_pass():
    runs = [{**row(1, n, p, rps), "repeat": k} for k, (one, many) in enumerate([(10.0, 9.0), (20.0, 10.0)])
            for n, p, rps in [(1, "-", one), (64, "uniform", many)]]
    found = check_targets(aggregate([{**r, "requests": 1, "failures": 0, "load_average_after": (1, 0, 0)}
                                     for r in runs]), [], runs)
    target = found["64 adapters (uniform, 1 replica(s)) vs 1"]
    assert target["per_pass"] == [0.9, 0.5]
    assert math.isclose(target["value"], 9.5 / 15.0) and target["met"] is False


def test_report_recomputes_a_results_json_and_plots_it(tmp_path, capsys):
    import json

    from benchmarks.serving import main

    runs = [{**row(r, n, p, rps), "repeat": 0, "requests": 10, "failures": 0, "load_average_after": (1.0, 0, 0)}
            for r in (1, 2) for n, p, rps in [(0, "-", 12.0), (1, "-", 10.0), (64, "uniform", 9.0), (64, "zipf", 8.0)]]
    switch = {"replicas": 1, "load": {"requests": 50, "failures": 0}, "stale_after_done": 0,
              "switches": [{"every_replica_serving_s": 0.3, "every_replica_dropped_s": 0.5, "complete": True,
                            "publish_s": 0.1}]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"runs": runs, "switch_runs": [switch], "rows": [], "targets": {}}))
    assert main(["--report", str(path)]) == 0
    written = json.loads(path.read_text())
    assert len(written["rows"]) == 8
    assert written["targets"]["64 adapters (uniform, 2 replica(s)) vs 1"]["met"] is True
    assert (tmp_path / "throughput.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "| 2 | 64 adapters | zipf | 8.0 |" in printed and "Anchors" in printed
