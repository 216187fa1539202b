"""The coordinator with the in-process job runner against the real SeaweedFS: publish, reject, fail,
batch, recover after a crash at each step, notify, purge."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from cluster import CoordinatorOptions, ErasureCoordinator, JobRunner, LocalErasureService, LocalJobRunner
from eraser.reference import split_heldout
from tenants.models import ReceiptStatus
from tenants.store import TenantStore
from tests.cluster.conftest import onboard_local
from tests.cluster.helpers import EIGEN, PIPELINE, SOLVE, remove_subject

OPTIONS = CoordinatorOptions(pipeline=PIPELINE, purge_grace_seconds=0)


class Crash(BaseException):
    """A coordinator process dying at a chosen point (not an error it could handle)."""


class NeverRun(JobRunner):
    def run_erasure_job(self, job):
        raise AssertionError(f"job re-run for {job.request_ids}")

    def run_training_job(self, job):
        raise AssertionError("training re-run")

    def run_curvature_job(self, job):
        raise AssertionError("curvature built")


def coordinator(store, runner=None, options=OPTIONS, hooks=()):
    return ErasureCoordinator("acme", store, runner or LocalJobRunner(), options, hooks=hooks)


def trained_subject(records, seed=0, fraction=0.5):
    """A subject all of whose records are in the training split (so the adapter holds them)."""
    from cluster.tenant_inputs import to_eraser_records

    train, _ = split_heldout(to_eraser_records(records), fraction, seed)
    train_ids = {r.id for r in train}
    for subject in sorted({r.subject for r in records}):
        if all(r.id in train_ids for r in records if r.subject == subject):
            return subject
    raise AssertionError("no subject entirely in the training split")


def test_erasure_publishes_versions_moves_head_purges_and_completes_the_receipt(grace0_settings, tiny_base,
                                                                                recorded_metrics):
    store, records = onboard_local(grace0_settings, tiny_base)
    subject = trained_subject(records["acme"])
    erased = {r.id for r in records["acme"] if r.subject == subject}
    calls = []
    hook = lambda tenant, head: calls.append((tenant, head.adapter)) or {"switched_at": "2030-01-01T00:00:00+00:00"}  # noqa: E731
    core = coordinator(store, hooks=[hook])
    core.submit({"request_id": "req-1", "tenant": "acme", "kind": "remove", "subjects": [subject]})

    reports = core.run_until_idle()

    assert [r.status for r in reports] == ["published"]
    head, _ = store.get_head("acme")
    assert (head.adapter, head.data) == ("v000002", "d000002")
    assert store.list_adapter_versions("acme") == ["v000002"]  # v000001 purged (grace 0)
    assert store.list_data_versions("acme") == ["d000002"]
    assert erased.isdisjoint(r.id for r in store.read_dataset("acme", "d000002"))
    assert len(store.read_dataset("acme", "d000002")) == len(records["acme"]) - len(erased)
    manifest = store.get_adapter_manifest("acme", "v000002")
    assert manifest.request_ids == ["req-1"] and manifest.parent_version == "v000001"
    assert manifest.path == "influence" and manifest.solver["converged"] and manifest.checks["guard"]["passed"]
    receipt = store.get_receipt("acme", "req-1")
    assert receipt.status == ReceiptStatus.published and receipt.error is None
    assert (receipt.old_adapter_version, receipt.new_adapter_version) == ("v000001", "v000002")
    assert (receipt.old_data_version, receipt.new_data_version) == ("d000001", "d000002")
    assert sorted(receipt.records_affected) == sorted(erased)
    assert receipt.path == "influence" and receipt.solver["converged"]
    assert receipt.checks["verification"]["after"]["passed"] and receipt.checks["guard"]["passed"]
    assert receipt.checks["retained"]["after"] <= receipt.checks["retained"]["bound"]
    assert {"queued_s", "load_s", "influence_s", "verify_s", "publish_s", "total_s"} <= set(receipt.stages)
    assert {(p.kind, p.version) for p in receipt.purged} == {("adapter", "v000001"), ("data", "d000001")}
    assert receipt.published_at is not None and receipt.replicas_switched_at is not None
    assert receipt.completed_at is not None and receipt.completion.ok  # each condition checked, not assumed
    assert calls == [("acme", "v000002")]
    assert recorded_metrics.values("eraser_erasures_total", tenant="acme", status="published") == [1]
    by_stage = {stage: recorded_metrics.values("eraser_erasure_stage_seconds", stage=stage)
                for stage in recorded_metrics.tags("eraser_erasure_stage_seconds", "stage")}
    assert {"load", "influence", "verify", "publish", "total"} <= set(by_stage)
    assert by_stage["total"] == [pytest.approx(receipt.stages["total_s"])]


def test_invalid_requests_are_rejected_with_the_reason_and_nothing_is_published(grace0_settings, tiny_base, caplog):
    store, _ = onboard_local(grace0_settings, tiny_base)
    core = coordinator(store, runner=NeverRun())
    core.submit({"request_id": "bad-id", "tenant": "acme", "kind": "remove", "records": ["nope"]})
    core.submit({"request_id": "bad-subject", "tenant": "acme", "kind": "remove", "subjects": ["Nobody Here"]})

    with caplog.at_level("DEBUG"):
        assert core.run_until_idle() == []
    # The reason names the subject: it goes to the receipt (redacted after retention), never to the logs,
    # which outlive every retention policy (issue 16).
    assert "bad-subject" in caplog.text and "Nobody Here" not in caplog.text

    for request_id, words in (("bad-id", "no records ['nope']"), ("bad-subject", "Nobody Here")):
        receipt = store.get_receipt("acme", request_id)
        assert receipt.status == ReceiptStatus.rejected and words in receipt.error and receipt.rejected_at
    assert store.get_head("acme")[0].adapter == "v000001"
    assert store.list_adapter_versions("acme") == ["v000001"]


def test_a_candidate_the_guard_refuses_is_not_published_and_the_receipt_says_why(grace0_settings, tiny_base,
                                                                                 recorded_metrics):
    store, records = onboard_local(grace0_settings, tiny_base)
    unconverged = replace(SOLVE, max_iters=1, tol=1e-9, require_converged=False)
    pipeline = replace(PIPELINE, solve=unconverged, remediate=False, retrain=False)
    core = coordinator(store, options=CoordinatorOptions(pipeline=pipeline, purge_grace_seconds=0))
    core.submit({"request_id": "req-1", "tenant": "acme", "kind": "remove", "subjects": [trained_subject(records["acme"])]})

    assert [r.status for r in core.run_until_idle()] == ["failed"]

    receipt = store.get_receipt("acme", "req-1")
    assert receipt.status == ReceiptStatus.failed and "converged" in receipt.error
    assert receipt.checks["guard"]["converged"] is False and receipt.checks["guard"]["passed"] is False
    assert receipt.new_adapter_version is None
    assert store.get_head("acme")[0].adapter == "v000001"
    assert store.list_adapter_versions("acme") == ["v000001"] and store.list_data_versions("acme") == ["d000001"]
    assert recorded_metrics.values("eraser_erasures_total", tenant="acme", status="failed") == [1]
    assert not recorded_metrics.values("eraser_erasures_total", status="published")


def test_a_failure_reason_naming_a_subject_reaches_the_receipt_but_not_the_logs(grace0_settings, tiny_base, caplog):
    from cluster.errors import JobFailedError

    store, records = onboard_local(grace0_settings, tiny_base)
    subject = trained_subject(records["acme"])

    class Leaky(NeverRun):
        def run_erasure_job(self, job):  # an error whose text quotes the request, as a method error can
            raise JobFailedError(f"worker lost while erasing {subject!r} ({job.request_ids})")

    core = coordinator(store, runner=Leaky(), options=replace(OPTIONS, max_attempts=1))
    core.submit({"request_id": "req-1", "tenant": "acme", "kind": "remove", "subjects": [subject]})
    with caplog.at_level("DEBUG"):
        assert [r.status for r in core.run_until_idle()] == ["failed"]

    assert "req-1" in caplog.text and "<redacted>" in caplog.text and subject not in caplog.text
    assert subject in store.get_receipt("acme", "req-1").error  # the receipt keeps the reason whole


def test_pending_requests_are_batched_into_one_solve_and_clashing_edits_wait(grace0_settings, tiny_base):
    store, records = onboard_local(grace0_settings, tiny_base)
    acme = records["acme"]
    subjects = sorted({r.subject for r in acme})
    first = next(r for r in acme if r.subject == subjects[2])
    core = coordinator(store)
    core.submit(remove_subject("acme", "rm-a", acme, 0))
    core.submit(remove_subject("acme", "rm-b", acme, 1))
    core.submit({"request_id": "fix-c", "tenant": "acme", "kind": "correct_response", "records": [first.id],
                 "replacements": {first.id: {"response": "That is not on file."}}})
    core.submit({"request_id": "rm-c", "tenant": "acme", "kind": "remove", "records": [first.id]})  # same record

    reports = core.run_until_idle()

    assert [(r.request_ids, r.status) for r in reports] == [(["rm-a", "rm-b", "fix-c"], "published"),
                                                              (["rm-c"], "published")]
    assert {r: store.get_receipt("acme", r).new_adapter_version for r in ("rm-a", "rm-b", "fix-c", "rm-c")} == {
        "rm-a": "v000002", "rm-b": "v000002", "fix-c": "v000002", "rm-c": "v000003"}
    assert store.get_adapter_manifest("acme", "v000003").request_ids == ["rm-c"]
    final = {r.id: r for r in store.read_dataset("acme", store.get_head("acme")[0].data)}
    assert first.id not in final
    assert not any(r.subject in subjects[:2] for r in final.values())
    assert store.list_data_versions("acme") == ["d000003"]  # superseded ones purged (grace 0)


def _crash_store(settings, method: str, after: bool):
    """A store whose ``method`` dies (before or after doing its work): the coordinator process 'crashes'."""
    store = TenantStore(settings)
    real = getattr(store, method)

    def dying(*args, **kwargs):
        if after:
            real(*args, **kwargs)
        raise Crash(method)

    setattr(store, method, dying)
    return store


@pytest.mark.parametrize("crash_at, after, reruns", [
    ("run_erasure_job", False, True),  # died in the job: nothing committed -> re-queued and run again
    ("publish_adapter", True, False),  # adapter committed, HEAD not moved -> recovery moves HEAD
    ("move_head", True, False),  # HEAD moved, receipt still running -> recovery marks it published
])
def test_after_a_crash_nothing_is_lost_and_nothing_runs_twice(grace0_settings, tiny_base, crash_at, after, reruns):
    store, records = onboard_local(grace0_settings, tiny_base)
    request = remove_subject("acme", "req-1", records["acme"], 3)
    if crash_at == "run_erasure_job":
        class Dying(LocalJobRunner):
            def run_erasure_job(self, job):
                raise Crash("job")
        first = coordinator(store, runner=Dying())
    else:
        first = coordinator(_crash_store(grace0_settings, crash_at, after))
    first.submit(request)
    with pytest.raises(Crash):
        first.run_until_idle()
    assert store.get_receipt("acme", "req-1").status == ReceiptStatus.running

    second = coordinator(TenantStore(grace0_settings), runner=LocalJobRunner() if reruns else NeverRun())
    second.run_until_idle()

    receipt = store.get_receipt("acme", "req-1")
    assert receipt.status == ReceiptStatus.published
    head = store.get_head("acme")[0]
    assert head.adapter == receipt.new_adapter_version == "v000002" and head.data == receipt.new_data_version
    assert store.list_adapter_versions("acme") == ["v000002"]  # one version for the request, the old one purged
    assert store.get_adapter_manifest("acme", "v000002").request_ids == ["req-1"]
    assert receipt.purged


def test_a_request_only_about_held_out_records_publishes_without_a_solve(grace0_settings, tiny_base):
    store, records = onboard_local(grace0_settings, tiny_base)
    from cluster.tenant_inputs import to_eraser_records

    _, heldout = split_heldout(to_eraser_records(records["acme"]), 0.5, 0)
    target = heldout[0].id
    core = coordinator(store)
    core.submit({"request_id": "held", "tenant": "acme", "kind": "remove", "records": [target]})

    assert [r.status for r in core.run_until_idle()] == ["published"]

    receipt = store.get_receipt("acme", "held")
    assert receipt.solver.get("skipped") and receipt.records_affected == [target]
    assert target not in {r.id for r in store.read_dataset("acme", receipt.new_data_version)}


def test_local_service_submit_is_idempotent_and_processes_tenants_in_parallel(grace0_settings, tiny_base):
    store, records = onboard_local(grace0_settings, tiny_base, tenants=("acme", "globex"))
    service = LocalErasureService(grace0_settings, options=OPTIONS)
    for tenant in ("acme", "globex"):
        request = remove_subject(tenant, f"{tenant}-1", records[tenant], 4)
        assert service.submit(request).status == ReceiptStatus.pending
        assert service.submit(request).status == ReceiptStatus.pending  # same id: the same erasure

    reports = service.process(["acme", "globex"])

    assert {t: [r["status"] for r in items] for t, items in reports.items()} == {"acme": ["published"],
                                                                                  "globex": ["published"]}
    for tenant in ("acme", "globex"):
        assert store.get_receipt(tenant, f"{tenant}-1").status == ReceiptStatus.published


def test_a_warmed_curvature_gives_the_update_the_job_would_build_and_a_stale_one_is_not_used(grace0_settings,
                                                                                             tiny_base):
    from cluster.jobs import CurvatureJob, ErasureJob
    from safetensors.torch import load_file

    store, records = onboard_local(grace0_settings, tiny_base)
    runner = LocalJobRunner()
    with runner.run_curvature_job(CurvatureJob("acme", grace0_settings, "v000001", "d000001", EIGEN)) as result:
        assert result.ok, result.error
        warmed = result.load_curvature()
    assert warmed.rank > 0 and warmed.info["config"]["rank"] == EIGEN.rank

    request = remove_subject("acme", "req-1", records["acme"], 1)
    selected = [r.id for r in records["acme"] if r.subject == request["subjects"][0]]
    updates, sources = {}, {}
    for name, curvature in (("built", None), ("warmed", warmed),
                            ("stale", replace(warmed, info={**warmed.info, "adapter": "0" * 64}))):
        job = ErasureJob("acme", grace0_settings, "v000001", "d000001", (request,), {"req-1": tuple(selected)},
                         pipeline=replace(PIPELINE, solve=EIGEN), curvature=curvature)
        with runner.run_erasure_job(job) as result:
            assert result.ok, result.error
            updates[name] = load_file(result.adapter_dir / "adapter_model.safetensors")
            sources[name] = result.body["solver"]["curvature_cache"]
    assert sources == {"built": "built in this job", "warmed": "warmed after the adapter version was published",
                       "stale": "built in this job"}
    for key, tensor in updates["built"].items():
        assert torch.equal(updates["warmed"][key], tensor)  # the same curvature, bit for bit
        assert torch.equal(updates["stale"][key], tensor)


def test_the_coordinator_warms_head_uses_it_once_and_drops_it_when_head_moves(grace0_settings, tiny_base):
    store, records = onboard_local(grace0_settings, tiny_base)
    core = coordinator(store, options=replace(OPTIONS, pipeline=replace(PIPELINE, solve=EIGEN)))
    assert core.warmed_version is None
    assert core.warm_curvature() and core.warmed_version == "v000001"
    assert not core.warm_curvature()  # already warm: no second job

    core.submit(remove_subject("acme", "req-1", records["acme"], 1))
    assert [r.status for r in core.run_until_idle()] == ["published"]
    receipt = store.get_receipt("acme", "req-1")
    assert receipt.solver["curvature_cache"] == "warmed after the adapter version was published"
    assert core.warmed_version is None  # v000001's curvature (estimated from the erased records) is gone
    assert core.warm_curvature() and core.warmed_version == "v000002"

    cold = coordinator(store, runner=NeverRun(), options=replace(OPTIONS, warm_curvature=False))
    assert not cold.warm_curvature()  # switched off: no job
