"""The checks of a complete erasure (tenants.completion, TenantStore.check_completion): each reads what
it claims, a redacted receipt is checked by its digests, and every fault leaves a check failed."""

from __future__ import annotations

from datetime import timedelta

from tenants.completion import records_gone, replicas_switched
from tenants.models import Completion, CompletionCheck, ErasureRequest, Receipt, Replacement, utcnow
from tenants.retention import redact_receipt

from tests.tenants.helpers import erase_r1, records


def receipt_of(request: ErasureRequest, affected: list[str]) -> Receipt:
    receipt = Receipt(request=request)
    receipt.transition("running", records_affected=affected)
    return receipt.transition("published")


def correction(new: str = "code-fixed") -> Receipt:
    request = ErasureRequest(request_id="req-2", tenant="acme", kind="correct_response", records=["r2"],
                             replacements={"r2": Replacement(response=new)})
    return receipt_of(request, ["r2"])


def test_a_removal_is_gone_only_when_no_record_of_it_is_left():
    receipt = receipt_of(ErasureRequest(request_id="req-1", tenant="acme", kind="remove", records=["r1", "r3"]),
                         ["r1", "r3"])
    data = records(6)

    kept = records_gone(receipt, "d000002", data)
    gone = records_gone(receipt, "d000002", [r for r in data if r.id not in ("r1", "r3")])

    assert not kept.ok and kept.detail == "2 of 2 erased record(s) in HEAD's data d000002"
    assert gone.ok and "r1" not in gone.detail  # counts, never record ids


def test_a_correction_is_gone_when_the_record_holds_its_replacement_or_is_removed():
    receipt = correction()
    data = records(6)
    fixed = [r.replaced("response", "code-fixed") if r.id == "r2" else r for r in data]

    assert not records_gone(receipt, "d2", data).ok  # the old response is still what r2 holds
    assert records_gone(receipt, "d2", fixed).ok
    assert records_gone(receipt, "d2", [r for r in data if r.id != "r2"]).ok  # a later removal
    # corrected again since: this receipt cannot tell the later edit from the old value, so it never says gone
    assert not records_gone(receipt, "d2", [r.replaced("response", "other") if r.id == "r2" else r for r in data]).ok


def test_a_redacted_receipt_is_checked_by_its_digests():
    receipt = redact_receipt(correction(), utcnow())
    assert receipt.records_affected != ["r2"]
    data = records(6)
    fixed = [r.replaced("response", "code-fixed") if r.id == "r2" else r for r in data]

    assert not records_gone(receipt, "d2", data).ok and records_gone(receipt, "d2", fixed).ok


def test_a_receipt_without_affected_records_is_never_taken_as_gone():
    receipt = receipt_of(ErasureRequest(request_id="req-1", tenant="acme", kind="remove", records=["r1"]), [])
    assert not records_gone(receipt, "d2", []).ok


def test_replicas_switched_is_the_stamp_or_said_to_be_no_hook_never_claimed():
    receipt = correction()
    assert not replicas_switched(receipt, hooks_registered=True).ok
    without = replicas_switched(receipt, hooks_registered=False)
    assert without.ok and "no serving hook registered" in without.detail
    receipt.update(replicas_switched_at=utcnow())
    assert replicas_switched(receipt, hooks_registered=True).ok


def test_the_completion_goes_into_the_receipts_json():
    ok, failed = CompletionCheck(ok=True, detail="a"), CompletionCheck(ok=False, detail="b")
    completion = Completion(checked_at=utcnow(), records_gone=ok, versions_purged=failed, replicas_switched=ok)
    receipt = correction().update(completion=completion)

    again = Receipt.model_validate_json(receipt.model_dump_json())

    assert not completion.ok and again.completion == completion and again.completed_at is None
    assert receipt.model_dump(mode="json")["completion"]["versions_purged"] == {"ok": False, "detail": "b"}


def test_the_store_checks_the_versions_left_and_the_files_a_purge_left_behind(store, tmp_path):
    d1, v1, d2, v2 = erase_r1(store, tmp_path)
    head, _ = store.get_head("acme")
    receipt = store.get_receipt("acme", "req-1")

    records_check, versions = store.check_completion("acme", head, [receipt])["req-1"]
    assert records_check.ok and not versions.ok and versions.detail == f"still held by {v1}, {d1}"

    # a purge interrupted after the commit marker: the version is unlisted, its shards are still there
    store.io.delete_keys([store.layout.data_manifest("acme", d1)])
    _, versions = store.check_completion("acme", head, [receipt])["req-1"]
    assert not versions.ok and versions.detail == f"still held by {v1}"
    store.purge("acme", v2, d2, older_than=0, now=utcnow() + timedelta(seconds=1))
    _, versions = store.check_completion("acme", head, [receipt])["req-1"]
    assert not versions.ok and versions.detail == f"files of {d1} left without a commit marker"

    store.orphan_seconds = 0  # the orphan sweep takes the leftover
    store.purge("acme", v2, d2, older_than=0, now=utcnow() + timedelta(seconds=1))
    records_check, versions = store.check_completion("acme", head, [receipt])["req-1"]
    assert records_check.ok and versions.ok and versions.detail.startswith("none of 1 adapter and 1 data version")
