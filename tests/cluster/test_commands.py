"""`eraser tenants train|erase --local` and `python -m cluster.batch --local` against the real SeaweedFS."""

from __future__ import annotations

import io
import json

import pytest

from cli.main import main as eraser
from cluster import batch
from tenants.models import ReceiptStatus
from tenants.store import TenantStore
from tests.cluster.helpers import SOLVE, create_tenant, tenant_records


@pytest.fixture
def configured(grace0_settings, monkeypatch):
    """The store as the commands see it: ERASER_S3_* in the environment."""
    s = grace0_settings
    for name, value in {"ENDPOINT": s.endpoint, "BUCKET": s.bucket, "PREFIX": s.prefix, "ACCESS_KEY": s.access_key,
                        "SECRET_KEY": s.secret_key.get_secret_value(), "REGION": "us-east-1",
                        "CACHE_DIR": str(s.cache_dir), "PURGE_GRACE_SECONDS": "0"}.items():
        monkeypatch.setenv(f"ERASER_S3_{name}", value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return TenantStore(s)


SOLVER_FLAGS = ["--damping", str(SOLVE.damping), "--tol", str(SOLVE.tol), "--max-iters", str(SOLVE.max_iters)]


def test_tenants_train_then_erase_locally(configured, tiny_base, tmp_path, capsys):
    store = configured
    records = tenant_records("acme")
    create_tenant(store, "acme", tiny_base, records)

    assert eraser(["tenants", "train", "acme", "--local"]) == 0
    assert "adapter v000001 trained on data d000001" in capsys.readouterr().out

    subject = sorted({r.subject for r in records})[5]
    (tmp_path / "r.json").write_text(json.dumps({"request_id": "cli-1", "kind": "remove", "subjects": [subject]}))
    assert eraser(["tenants", "erase", "acme", "--request", str(tmp_path / "r.json"), "--local",
                   "--purge-grace", "0"]) == 0
    out = capsys.readouterr().out
    assert "cli-1" in out and "published" in out and "v000001 -> v000002" in out and "; complete" in out
    receipt = store.get_receipt("acme", "cli-1")
    assert receipt.status == ReceiptStatus.published and receipt.completed_at is not None
    assert store.get_head("acme")[0].adapter == "v000002"

    assert eraser(["tenants", "train", "acme", "--local"]) == 2  # HEAD exists: one line, exit 2
    assert "already has HEAD" in capsys.readouterr().err


def test_batch_entry_locally_reports_failures_with_a_non_zero_exit(configured, tiny_base, tmp_path):
    store = configured
    create_tenant(store, "initech", tiny_base)  # records but never trained: no HEAD
    records = tenant_records("initech")
    lines = [json.dumps({"request_id": "i-1", "tenant": "initech", "kind": "remove", "records": [records[0].id]}),
             json.dumps({"request_id": "x-1", "tenant": "nobody", "kind": "remove", "records": ["a"]}),
             "{not json"]
    (tmp_path / "batch.jsonl").write_text("\n".join(lines) + "\n")
    out = io.StringIO()

    code = batch.main(["--requests", str(tmp_path / "batch.jsonl"), "--local", "--purge-grace", "0", *SOLVER_FLAGS],
                      out=out)

    text = out.getvalue()
    assert code == 1, text
    assert "TENANT" in text and "STATUS" in text
    assert store.get_receipt("initech", "i-1").status == ReceiptStatus.failed
    assert "onboard it first" in store.get_receipt("initech", "i-1").error
    rows = {line.split()[1]: line for line in text.splitlines() if line.startswith(("initech", "nobody", "?"))}
    assert "failed" in rows["i-1"] and "invalid" in rows["x-1"] and "does not exist" in rows["x-1"]
    assert "invalid JSON" in text


def test_requests_parse_from_a_list_an_object_or_json_lines():
    one = {"request_id": "a", "tenant": "acme", "kind": "remove", "records": ["r1"]}
    two = {**one, "request_id": "b"}
    for text in (json.dumps([one, two]), json.dumps(one) + "\n" + json.dumps(two) + "\n"):
        assert [e.request.request_id for e in batch.parse_requests(text, "f")] == ["a", "b"]
    assert [e.request.request_id for e in batch.parse_requests(json.dumps(one, indent=2), "f")] == ["a"]
    (bad,) = batch.parse_requests(json.dumps({**one, "kind": "forget"}), "f")
    assert bad.request is None and "kind" in bad.error


def test_the_ray_runner_uses_train_for_several_workers_and_a_pooled_task_for_one(monkeypatch):
    from cluster import LocalJobRunner, RayTaskJobRunner, RayTrainJobRunner, RunnerSpec, make_runner
    from cluster.errors import ClusterError

    assert isinstance(make_runner(RunnerSpec(num_workers=1)), RayTaskJobRunner)
    assert isinstance(make_runner(RunnerSpec(num_workers=2)), RayTrainJobRunner)
    assert isinstance(make_runner(RunnerSpec(kind="ray-train", num_workers=1)), RayTrainJobRunner)
    assert isinstance(make_runner(RunnerSpec(kind="local")), LocalJobRunner)
    monkeypatch.setenv("ERASER_CLUSTER_RUNNER", "ray-train")
    assert RunnerSpec().kind == "ray-train"
    monkeypatch.setenv("ERASER_CLUSTER_RUNNER", "slurm")
    with pytest.raises(ClusterError, match="ERASER_CLUSTER_RUNNER: Input should be 'ray', 'ray-train' or 'local'"):
        RunnerSpec()
    monkeypatch.setenv("ERASER_CLUSTER_RUNNER", "")  # empty is unset
    monkeypatch.setenv("ERASER_CLUSTER_JOB_TIMEOUT", "an hour")
    with pytest.raises(ClusterError, match="ERASER_CLUSTER_JOB_TIMEOUT: Input should be a valid number"):
        RunnerSpec()
    monkeypatch.setenv("ERASER_CLUSTER_JOB_TIMEOUT", "90")
    assert RunnerSpec().kind == "ray" and RunnerSpec().job_timeout_s == 90.0
