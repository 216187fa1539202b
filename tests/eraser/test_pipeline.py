"""verified_erase end to end, with the production defaults: which path each regime takes, that the
deciding half of the reference judges what the steering half chose, and that nothing failing is
returned.

Shares the session world of ``test_verify.py`` (a pretrained tiny base, customer records with secrets).
"""

from __future__ import annotations

import copy
import sys
from dataclasses import replace

import pytest
import torch

from eraser.errors import VerificationFailedError, VerificationUnavailableError
from eraser.pipeline import PipelineConfig, complete_erasure, run_influence, verified_erase
from eraser.reference import subject_key
from eraser.requests import EditRequest
from eraser.update import lora_vector
from eraser.verify import VerifyResult
from tests.eraser.test_verify import LIGHT, MEMORISED, erased_subject, request, trained, world

DEFAULTS = PipelineConfig()


def base_factory():
    return copy.deepcopy(world().base)


def run(model, requests, config: PipelineConfig = DEFAULTS, recipe=MEMORISED, heldout=None):
    w = world()
    return verified_erase(model, w.tokenizer, w.train, requests, w.heldout if heldout is None else heldout,
                          recipe=recipe, config=config, base_factory=base_factory)


def assert_publishable(outcome):
    assert outcome.verification is not None
    if outcome.path != "retrain":
        assert outcome.verification.passed, outcome.verification.reason
        assert outcome.retained_after <= outcome.retained_bound
    assert all(outcome.guard.values()), outcome.guard
    for stage in ("influence_s", "verify_s", "guard_s", "total_s"):
        assert outcome.stages[stage] >= 0
    summary = outcome.summary()
    assert summary["path"] == outcome.path and summary["reference"]["decision_looks"] == 2


def test_memorised_records_are_erased_by_a_passing_adapter_within_the_guard():
    model = trained(MEMORISED)
    outcome = run(model, [request("remove", (erased_subject(),))], replace(DEFAULTS, verify_original=True))
    assert not outcome.verification_before.passed  # the original adapter recites them
    assert outcome.path in ("influence", "influence+remediation", "retrain")
    assert_publishable(outcome)
    assert outcome.search is not None and outcome.search.evaluations  # the damping was searched
    if outcome.verification.exposure_max is not None:
        assert outcome.verification.exposure_max < outcome.verification_before.exposure_max


def test_a_non_memorised_adapter_publishes_straight_from_the_low_rank_update():
    model = trained(LIGHT)
    before = lora_vector(model)
    outcome = run(model, [request("remove", (erased_subject(),))], recipe=LIGHT)
    assert outcome.path == "influence"
    assert_publishable(outcome)
    assert outcome.remediation is None and outcome.retrain is None
    assert outcome.solver.extra["lowrank_exact"] and outcome.solver.iterations == 0  # the fast path
    assert outcome.damping == pytest.approx(outcome.search.damping)
    assert not torch.equal(lora_vector(model), before)  # the update was applied
    assert outcome.checks["affected_loss_after"] > outcome.checks["affected_loss_before"]


def test_a_correction_of_memorised_secrets_publishes():
    model = trained(MEMORISED)
    outcome = run(model, [request("correct_response", (erased_subject(),))])
    assert_publishable(outcome)
    assert "new" in outcome.search.targets  # the new answers steer the damping
    assert outcome.verification.new_score_median <= outcome.verification.learned_threshold


def test_the_steering_half_steers_and_the_deciding_half_decides(monkeypatch):
    """Remediation sees only the steering half; every published decision is a look at the deciding
    half at alpha / decision_looks."""
    import eraser.pipeline as pipeline

    seen: dict = {"looks": []}
    real_verify, real_remediate = pipeline.verify, pipeline.remediate

    def spy_verify(model, tokenizer, edits, reference, config, **kwargs):
        seen["looks"].append(({r.id for r in reference}, config.alpha))
        return real_verify(model, tokenizer, edits, reference, config, **kwargs)

    def spy_remediate(model, tokenizer, edits, records_after, heldout, *args, **kwargs):
        seen["steering"] = {r.id for r in heldout}
        return real_remediate(model, tokenizer, edits, records_after, heldout, *args, **kwargs)

    monkeypatch.setattr(pipeline, "verify", spy_verify)
    monkeypatch.setattr(pipeline, "remediate", spy_remediate)
    outcome = run(trained(MEMORISED), [request("remove", (erased_subject(),))])
    reference = outcome.reference
    assert not reference["shared"] and reference["decision_alpha"] == pytest.approx(DEFAULTS.verify.alpha / 2)
    deciding = seen["looks"][0][0]
    assert all(ids == deciding and alpha == pytest.approx(0.025) for ids, alpha in seen["looks"])
    assert len(seen["looks"]) <= 3  # influence, remediation, and (reported only) the retrain
    if "steering" in seen:
        assert seen["steering"].isdisjoint(deciding)
        w = world()
        subjects = lambda ids: {subject_key(r) for r in w.heldout if r.id in ids}  # noqa: E731
        assert subjects(seen["steering"]).isdisjoint(subjects(deciding))


def test_a_remediation_that_took_no_step_gets_no_second_look(monkeypatch):
    """When the steering half passes the candidate the deciding half rejected, remediation stops at step 0
    with the same weights: judging them again on the deciding half cannot change the verdict, so the
    retrain follows at once."""
    import eraser.pipeline as pipeline
    from eraser.remediate import RemediationReport

    looks: list = []
    real_verify = pipeline.verify

    def rejecting_influence(*args, **kwargs):
        result: VerifyResult = real_verify(*args, **kwargs)
        looks.append(result)
        if len(looks) == 1:  # the influence candidate
            result.passed, result.reason = False, "still distinguishable (forced by the test)"
        return result

    monkeypatch.setattr(pipeline, "verify", rejecting_influence)
    monkeypatch.setattr(pipeline, "remediate", lambda *a, **k: RemediationReport(passed=True, steps=0,
                                                                               stopped_by="passed"))
    outcome = run(trained(LIGHT), [request("remove", (erased_subject(),))], recipe=LIGHT)
    assert outcome.path == "retrain"
    assert len(looks) == 2  # the influence candidate, then the retrain (reported); no second look between


def test_the_exact_retrain_is_published_even_when_the_test_rejects_it(monkeypatch):
    """A retrain is the target the estimate stands in for: a failing test can only be a false failure."""
    import eraser.pipeline as pipeline

    real_verify = pipeline.verify

    def always_failing(*args, **kwargs):
        result: VerifyResult = real_verify(*args, **kwargs)
        result.passed, result.reason = False, "still distinguishable (forced by the test)"
        return result

    monkeypatch.setattr(pipeline, "verify", always_failing)
    config = replace(DEFAULTS, remediate=False)
    outcome = run(trained(LIGHT), [request("remove", (erased_subject(),))], config, recipe=LIGHT)
    assert outcome.path == "retrain" and outcome.guard == {"finite": True}
    assert outcome.checks["retrain_reported"]["membership_test_passed"] is False
    assert outcome.summary()["reference"]["decision_looks"] == 1


def test_nothing_failing_is_returned_without_the_fallbacks(monkeypatch):
    import eraser.pipeline as pipeline

    real_verify = pipeline.verify

    def failing(*args, **kwargs):
        result = real_verify(*args, **kwargs)
        result.passed = False
        return result

    monkeypatch.setattr(pipeline, "verify", failing)
    w = world()
    model = trained(MEMORISED)
    stage = run_influence(model, w.tokenizer, w.train, [request("remove", (erased_subject(),))], DEFAULTS,
                          heldout=w.heldout)
    strict = replace(DEFAULTS, remediate=False, retrain=False)
    with pytest.raises(VerificationFailedError, match="no adapter passed verification") as error:
        complete_erasure(model, w.tokenizer, stage, w.heldout, MEMORISED, strict)
    assert error.value.outcome is not None and not error.value.outcome.verification_influence.passed


def test_without_a_held_out_reference_it_refuses_or_marks_unverified():
    model = trained(LIGHT)
    requests = [request("remove", (erased_subject(),))]
    with pytest.raises(VerificationUnavailableError, match="could not verify"):
        run(copy.deepcopy(model), requests, recipe=LIGHT, heldout=[])
    lenient = replace(DEFAULTS, require_verification=False)
    outcome = run(model, requests, config=lenient, recipe=LIGHT, heldout=[])
    assert outcome.path == "influence" and not outcome.verified
    assert outcome.search is None  # nothing to steer by: the configured damping


def test_a_request_naming_only_held_out_records_leaves_the_adapter_unchanged():
    w = world()
    model = trained(LIGHT)
    before = lora_vector(model)
    target = w.heldout[0]
    outcome = run(model, [EditRequest(kind="remove", records=(target.id,), request_id="r-h")], recipe=LIGHT)
    assert outcome.path == "unchanged" and outcome.heldout_affected == [target.id] and not outcome.edits
    assert torch.equal(lora_vector(model), before)
