"""Receipts past retention keep the proof (request id, status, times, versions, statistics) and lose
what identifies people (subject names, record ids, replacement text, error text): done by purge."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tenants.errors import ConflictError
from tenants.models import ErasureRequest, normalize_subject, utcnow
from tenants.retention import redaction_digest
from tests.tenants.helpers import onboard

SECRETS = ("user1", "User1", "r1", "r4", "a brand new prompt", "code-1")


def ended(store, request: ErasureRequest, status: str, **fields):
    receipt, _ = store.submit_erasure(request)
    receipt.transition("running")
    receipt.transition(status, **fields)
    return store.save_receipt(receipt)


def test_purge_redacts_ended_receipts_past_retention_and_keeps_the_proof(store, tmp_path):
    d1, v1, _ = onboard(store, tmp_path)  # user1 has records r1 and r4
    by_subject = ErasureRequest(request_id="dsr-1", tenant="acme", kind="remove", subjects=["User1 "])
    published = ended(store, by_subject, "published", old_adapter_version=v1, new_adapter_version=v1,
                      old_data_version=d1, new_data_version=d1, records_affected=["r1", "r4"],
                      checks={"records": {"r1": {"nll": 1.5}, "r4": {"nll": 2.0}}, "passed": True})
    corrected = ErasureRequest(request_id="fix-1", tenant="acme", kind="modify_query", records=["r1"],
                               replacements={"r1": {"prompt": "a brand new prompt"}})
    ended(store, corrected, "rejected", error="record r1 of user1 ('code-1'): the test could not tell")
    running = ErasureRequest(request_id="dsr-2", tenant="acme", kind="remove", records=["r4"])
    store.submit_erasure(running)
    head, _ = store.get_head("acme")

    # within retention (30 days by default) nothing changes
    assert store.purge("acme", head.adapter, head.data, now=utcnow() + timedelta(days=29)) == []
    assert store.get_receipt("acme", "dsr-1").redacted_at is None
    assert store.purge("acme", head.adapter, head.data, now=utcnow() + timedelta(days=31)) == []
    kept = store.get_receipt("acme", "dsr-1")
    assert kept.redacted_at is not None
    text = "".join(store.get_receipt("acme", rid).model_dump_json() for rid in ("dsr-1", "fix-1"))
    assert not [s for s in SECRETS if s in text], text
    # the proof: id, status, times, versions, statistics; a subject's name checks against its digest
    assert (kept.status.value, kept.new_adapter_version, kept.published_at) == ("published", v1, published.published_at)
    assert kept.checks["passed"] is True and len(kept.records_affected) == 2
    assert kept.request.subjects == [redaction_digest("acme", "dsr-1", normalize_subject("user1"))]
    assert store.get_receipt("acme", "fix-1").error == "[redacted]"
    assert store.get_receipt("acme", "dsr-2").redacted_at is None  # not ended: untouched
    # the same request again is still the same request; another body under its id still a conflict
    again, created = store.submit_erasure(by_subject, validate=False)
    assert not created and again.request_id == "dsr-1"
    with pytest.raises(ConflictError):
        store.submit_erasure(by_subject.model_copy(update={"subjects": ["user2"]}), validate=False)


def test_retention_none_keeps_receipts_in_clear(s3_server, s3_bucket, tmp_path):
    import uuid

    from tenants.store import TenantStore

    store = TenantStore(s3_server.settings(bucket=s3_bucket, prefix=f"t-{uuid.uuid4().hex[:12]}",
                                           cache_dir=tmp_path / "cache", receipt_redact_after_seconds=None))
    d1, v1, _ = onboard(store, tmp_path)
    ended(store, ErasureRequest(request_id="dsr-1", tenant="acme", kind="remove", subjects=["user1"]), "published",
          records_affected=["r1", "r4"])
    store.purge("acme", v1, d1, now=utcnow() + timedelta(days=3650))
    assert store.get_receipt("acme", "dsr-1").request.subjects == ["user1"]
