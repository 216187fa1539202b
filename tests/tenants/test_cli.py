"""`eraser tenants ...` end to end (in-process), against the session S3 server and an embedded one."""

from __future__ import annotations

import json
import uuid

import pytest

from cli.main import main
from tenants.models import AdapterManifest, ErasureRequest, Head

from tests.tenants.helpers import adapter_dir

pytestmark = pytest.mark.slow


@pytest.fixture
def cli_env(s3_server, s3_bucket, monkeypatch, tmp_path):
    """Point the CLI at the session server under a fresh prefix; returns a matching store."""
    from tenants.store import TenantStore

    prefix = f"cli-{uuid.uuid4().hex[:8]}"
    for name, value in {"ENDPOINT": s3_server.endpoint, "BUCKET": s3_bucket, "PREFIX": prefix,
                        "ACCESS_KEY": s3_server.access_key, "SECRET_KEY": s3_server.secret_key,
                        "CACHE_DIR": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(f"ERASER_S3_{name}", value)
    monkeypatch.delenv("ERASER_ADMIN_KEY", raising=False)
    return TenantStore(s3_server.settings(bucket=s3_bucket, prefix=prefix, cache_dir=tmp_path / "cache"))


def write_records(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_tenant_lifecycle(cli_env, tmp_path, capsys):
    store = cli_env
    assert main(["tenants", "create", "acme", "--base-model", "tiny-llama", "--lora-rank", "4", "--issue-key"]) == 0
    out = capsys.readouterr().out
    api_key = out.strip().splitlines()[-1].split(": ", 1)[1]
    assert store.authenticate(api_key) == "acme"
    assert store.get_tenant("acme").lora.rank == 4

    records = write_records(tmp_path / "r.jsonl", [
        json.dumps({"id": f"r{i}", "subject": "s", "prompt": "p", "response": f"x{i}"}) for i in range(5)])
    assert main(["tenants", "upload", "acme", str(records)]) == 0
    assert "data version d000001 (5 records" in capsys.readouterr().out

    assert main(["tenants", "list"]) == 0
    assert capsys.readouterr().out.split() == ["acme"]

    assert main(["tenants", "keys", "issue", "acme", "--label", "ci"]) == 0
    second = capsys.readouterr().out.strip()
    assert store.authenticate(second) == "acme"
    assert main(["tenants", "keys", "list", "acme"]) == 0
    listed = capsys.readouterr().out.strip().splitlines()
    assert len(listed) == 2 and listed[1].endswith("ci")
    key_id = second.split("_")[2]
    assert main(["tenants", "keys", "revoke", "acme", key_id]) == 0
    assert main(["tenants", "keys", "revoke", "acme", key_id]) == 2

    # an erasure through the library, then receipts and purge through the CLI
    v1 = store.publish_adapter("acme", adapter_dir(tmp_path), AdapterManifest(data_version="d000001"))
    etag = store.move_head("acme", Head(adapter=v1, data="d000001"), None)
    request = ErasureRequest(request_id="req-1", tenant="acme", kind="remove", records=["r1"])
    receipt, _ = store.submit_erasure(request)
    d2 = store.put_dataset("acme", request.apply(store.iter_dataset("acme", "d000001"), ["r1"]), parent="d000001",
                           request_ids=["req-1"])
    v2 = store.publish_adapter("acme", adapter_dir(tmp_path, b"v2", "v2"),
                               AdapterManifest(parent_version=v1, data_version=d2, request_ids=["req-1"]))
    store.move_head("acme", Head(adapter=v2, data=d2), etag)
    store.save_receipt(receipt.transition("running").transition("published", new_adapter_version=v2))

    capsys.readouterr()
    assert main(["tenants", "show", "acme"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["head"]["adapter"] == v2 and shown["receipts"] == {"published": 1}
    assert "key_hashes" not in shown and all("hash" not in k for k in shown["keys"])

    assert main(["tenants", "receipts", "acme", "--status", "published"]) == 0
    assert [r["request"]["request_id"] for r in json.loads(capsys.readouterr().out)] == ["req-1"]

    assert main(["tenants", "purge", "acme"]) == 0  # default grace: too early
    assert "nothing to purge" in capsys.readouterr().out
    assert main(["tenants", "purge", "acme", "--grace", "0", "--dry-run"]) == 0
    assert "would delete adapter v000001" in capsys.readouterr().out
    assert main(["tenants", "purge", "acme", "--grace", "0"]) == 0
    out = capsys.readouterr().out
    assert "deleted adapter v000001" in out and "deleted data d000001" in out
    assert main(["tenants", "receipts", "acme", "--id", "req-1"]) == 0
    assert {p["version"] for p in json.loads(capsys.readouterr().out)["purged"]} == {"v000001", "d000001"}


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["tenants", "create", "../x", "--base-model", "m"], "tenant name"),
        (["tenants", "show", "nobody"], "tenant 'nobody' does not exist"),
        (["tenants", "upload", "nobody", "/no/such/file.jsonl"], "records file not found"),
        (["tenants", "receipts", "acme", "--id", "nope"], "no erasure request"),
        (["tenants", "purge", "acme"], "no HEAD"),
    ],
)
def test_errors_are_one_line(cli_env, capsys, argv, fragment):
    main(["tenants", "create", "acme", "--base-model", "m"])
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1 and err.startswith("eraser: error:")


def test_malformed_upload_names_the_line(cli_env, tmp_path, capsys):
    main(["tenants", "create", "acme", "--base-model", "m"])
    bad = write_records(tmp_path / "bad.jsonl", ['{"id": "a", "prompt": "p", "response": "r"}',
                                                 '{"id": "a", "prompt": "p", "response": "r"}'])
    assert main(["tenants", "upload", "acme", str(bad)]) == 2
    assert "bad.jsonl:2: duplicate record id 'a'" in capsys.readouterr().err
    assert cli_env.list_data_versions("acme") == []


def test_help_lists_actions(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["tenants", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for action in ("create", "list", "show", "upload", "keys", "receipts", "purge"):
        assert action in out


def test_embedded_store_in_data_dir(tmp_path, monkeypatch, capsys):
    for name in ("ENDPOINT", "BUCKET", "PREFIX", "CACHE_DIR"):
        monkeypatch.delenv(f"ERASER_S3_{name}", raising=False)
    home = tmp_path / "home"
    assert main(["tenants", "create", "acme", "--base-model", "m", "--data-dir", str(home)]) == 0
    assert main(["tenants", "list", "--data-dir", str(home)]) == 0  # a second start finds the data
    assert capsys.readouterr().out.splitlines()[-1] == "acme"
    assert (home / "s3").is_dir()
