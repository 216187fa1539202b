"""Conditional writes are idempotent under retries (issue 15, defect 2), on the real SeaweedFS.

botocore's standard retries resend a PUT whose response was lost. For a conditional PUT the resent
request gets 412, because the first attempt succeeded. The fake client here does exactly that: it
sends the chosen PUT to the server, drops the response, sends it again and returns what the server
says to the second attempt (a real 412). The store must read the 412 as "already written".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tenants.models import AdapterManifest, ErasureRequest, Head, ReceiptStatus
from tenants.store import TenantStore

from tests.tenants.helpers import adapter_dir, onboard

pytestmark = pytest.mark.slow


class ResendingClient:
    """Wraps a boto3 client; a ``put_object`` that ``resend(kwargs)`` picks is sent twice, the first
    response lost (what botocore's retry after a dropped response does)."""

    def __init__(self, real: Any, resend: Callable[[dict[str, Any]], bool]) -> None:
        self._real = real
        self._resend = resend
        self.resent: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._real, name)
        if name != "put_object":
            return attribute

        def put_object(**kwargs: Any) -> Any:
            if not self._resend(kwargs):
                return attribute(**kwargs)
            self.resent.append(kwargs["Key"])
            attribute(**kwargs)  # succeeds on the server; its response is "lost"
            return attribute(**kwargs)  # the retry: 412 from the server for a conditional PUT

        return put_object


def resending(store: TenantStore, key_part: str) -> TenantStore:
    conditional = lambda kw: key_part in kw["Key"] and ("IfMatch" in kw or "IfNoneMatch" in kw)  # noqa: E731
    return TenantStore(store.settings, client=ResendingClient(store.client, conditional))


def test_a_resent_head_move_is_one_move_not_a_conflict(store, tmp_path):
    data, v1, etag = onboard(store, tmp_path)
    v2 = store.publish_adapter("acme", adapter_dir(tmp_path, b"v2", "v2"), AdapterManifest(data_version=data,
                                                                                            parent_version=v1))
    retried = resending(store, "HEAD.json")

    new_etag = retried.move_head("acme", Head(adapter=v2, data=data), etag)

    assert retried.client.resent and retried.client.resent[0].endswith("HEAD.json")
    head, current = store.get_head("acme")
    assert head.adapter == v2 and current == new_etag


def test_a_resent_receipt_create_reports_created(store, tmp_path):
    onboard(store, tmp_path)
    retried = resending(store, "/erasures/")
    request = ErasureRequest(request_id="req-1", tenant="acme", kind="remove", records=["r1"])

    receipt, created = retried.submit_erasure(request, validate=False)

    assert retried.client.resent and created is True  # the backend is handed the request
    assert store.get_receipt("acme", "req-1").status == ReceiptStatus.pending


def test_a_resent_receipt_transition_is_applied_once(store, tmp_path):
    onboard(store, tmp_path)
    store.submit_erasure(ErasureRequest(request_id="req-1", tenant="acme", kind="remove", records=["r1"]),
                         validate=False)
    retried = resending(store, "/erasures/")
    calls = []

    def change(receipt):
        calls.append(receipt.status)
        receipt.transition(ReceiptStatus.running)  # a second call would raise (running -> running)

    receipt = retried.update_receipt("acme", "req-1", change)

    assert retried.client.resent and calls == [ReceiptStatus.pending]
    assert receipt.status == ReceiptStatus.running
    assert store.get_receipt("acme", "req-1").status == ReceiptStatus.running


def test_a_resent_version_claim_keeps_its_number(store, tmp_path):
    data, v1, _ = onboard(store, tmp_path)
    retried = resending(store, "_claim.json")

    version = retried.publish_adapter("acme", adapter_dir(tmp_path, b"v2", "v2"), AdapterManifest(data_version=data))

    assert version == "v000002" and store.list_adapter_versions("acme") == [v1, "v000002"]
    assert data in store.list_data_versions("acme")


def test_a_real_conflict_is_still_a_conflict(store, tmp_path):
    """The read-back accepts only exactly the bytes written: another writer's HEAD still wins."""
    from tenants.errors import HeadConflictError

    data, v1, etag = onboard(store, tmp_path)
    v2 = store.publish_adapter("acme", adapter_dir(tmp_path, b"v2", "v2"), AdapterManifest(data_version=data))
    v3 = store.publish_adapter("acme", adapter_dir(tmp_path, b"v3", "v3"), AdapterManifest(data_version=data))
    store.move_head("acme", Head(adapter=v2, data=data), etag)
    with pytest.raises(HeadConflictError):
        store.move_head("acme", Head(adapter=v3, data=data), etag)
    assert store.get_head("acme")[0].adapter == v2
