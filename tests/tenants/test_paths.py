"""Key building and name validation (no S3 needed)."""

from __future__ import annotations

import pytest

from tenants.errors import InvalidNameError, InvalidRequestIdError, InvalidTenantNameError, InvalidVersionError
from tenants.paths import S3Layout, validate_relative_file, validate_tenant_name

BAD_TENANTS = ["../x", "a/b", "", "..", ".", "A", "a_b", "-a", "a-", "a b", "a\x00", "x" * 64, "é", None, 3]


@pytest.mark.parametrize("name", BAD_TENANTS)
def test_bad_tenant_names_are_refused(name):
    with pytest.raises(InvalidTenantNameError):
        validate_tenant_name(name)
    with pytest.raises(InvalidTenantNameError):
        S3Layout("p").tenant_config(name)


@pytest.mark.parametrize("name", ["a", "acme", "acme-2", "0x", "a" * 63])
def test_good_tenant_names(name):
    assert validate_tenant_name(name) == name


def test_layout_is_designs():
    layout = S3Layout("")
    assert layout.model_dir("tiny-llama") == "models/tiny-llama/"
    assert layout.model_file("org/model", "config.json") == "models/org/model/config.json"
    assert layout.tenant_config("acme") == "tenants/acme/tenant.json"
    assert layout.data_shard("acme", "d000001", 0) == "tenants/acme/data/d000001/part-00000.jsonl.gz"
    assert layout.data_manifest("acme", "d000001") == "tenants/acme/data/d000001/dataset.json"
    assert layout.adapter_file("acme", "v000002", "adapter_model.safetensors") == (
        "tenants/acme/adapters/v000002/adapter_model.safetensors"
    )
    assert layout.adapter_manifest("acme", "v000002") == "tenants/acme/adapters/v000002/eraser.json"
    assert layout.head("acme") == "tenants/acme/HEAD.json"
    assert layout.receipt("acme", "req-1") == "tenants/acme/erasures/req-1.json"
    assert S3Layout("/a/b/").head("acme") == "a/b/tenants/acme/HEAD.json"


@pytest.mark.parametrize("version", ["", "1", "v1", "v00001", "../v000001", "v000001/..", "d000001"])
def test_bad_adapter_versions(version):
    with pytest.raises(InvalidVersionError):
        S3Layout().adapter_dir("acme", version)


@pytest.mark.parametrize("request_id", ["", "../x", "a/b", ".hidden", "a b", "x" * 129, "a\n"])
def test_bad_request_ids(request_id):
    with pytest.raises(InvalidRequestIdError):
        S3Layout().receipt("acme", request_id)


@pytest.mark.parametrize("name", ["", "../x", "a/../b", "/abs", "a//b", "a/./b", ".."])
def test_bad_file_names(name):
    with pytest.raises(InvalidNameError):
        validate_relative_file(name)


@pytest.mark.parametrize("prefix", ["..", "a/../b", "a/./b"])
def test_bad_prefixes(prefix):
    with pytest.raises(InvalidNameError):
        S3Layout(prefix)
