"""scripts/device_check.py: imports only what the accelerator machine has, and ``--tiny`` runs every
section on the CPU and writes the JSON the GPU run will write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_layering import imported_top_levels

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device_check.py"
# The accelerator machine's python3 has torch, transformers, peft, numpy and scipy, not this project's stack.
ALLOWED = {"eraser", "torch", "transformers", "peft", "numpy", "scipy", "tokenizers", "safetensors", "jinja2"}


def test_the_device_check_imports_only_the_method_and_what_the_accelerator_has():
    outside = {name for name in imported_top_levels(SCRIPT) - ALLOWED if name not in sys.stdlib_module_names}
    assert not outside, f"device_check.py imports {sorted(outside)}, which the accelerator machine lacks"


@pytest.mark.slow
def test_the_tiny_device_check_runs_every_section_on_the_cpu(tmp_path):
    out = tmp_path / "device_check.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["ok"] and not results["errors"], results["errors"]
    sections = results["sections"]
    assert sections["env"]["device"] == "cpu" and sections["env"]["dtype"] == "bfloat16"
    assert sections["base"]["parameters"] > 0 and sections["base"]["dtype"] == "torch.bfloat16"
    assert sections["training"]["steps"] > 0 and sections["training"]["lora_dtype"] == "torch.float32"
    assert sections["hvp"]["hvps_per_s"] > 0 and sections["hvp"]["vector_dtype"] == "torch.float32"
    assert sections["cache"]["rank"] > 0 and sections["cache"]["build_s"] > 0
    assert sections["cache"]["vectors_dtype"] == "torch.float32"
    assert sections["erasure"]["path"] in ("influence", "influence+remediation", "retrain")
    assert sections["erasure"]["per_request_s"] > 0 and sections["erasure"]["verified"] is True
    assert sections["retrain"]["wall_s"] > 0 and "retrain_over_request" in sections["retrain"]
    assert set(sections["retrain"]["erased_nll"]) == {"original", "erased", "retrained"}
    assert sections["device_equality"]["status"] == "skipped"  # no CUDA here
    assert sections["bf16_vs_fp32"]["within_0.1_nats"] is True
    assert results["total_s"] > 0 and results["data"]["train"] > 0
