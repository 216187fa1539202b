"""verified_erase end to end: which path each regime takes, and that nothing failing is returned.

Shares the session world of ``test_verify.py`` (a pretrained tiny base, customer records with secrets).
"""

from __future__ import annotations

import copy

import pytest
import torch

from eraser.errors import VerificationFailedError, VerificationUnavailableError
from eraser.influence import SolveConfig
from eraser.pipeline import DEFAULT_DAMPING, PipelineConfig, complete_erasure, run_influence, verified_erase
from eraser.requests import EditRequest
from eraser.update import lora_vector
from tests.eraser.test_verify import LIGHT, MEMORISED, erased_subject, request, trained, world

# The measured damping, with fewer power iterations and a looser CG tolerance: these tests check the
# paths and the guarantees, not the solve's precision (tests/eraser/test_solvers.py does).
FAST = PipelineConfig(solve=SolveConfig(damping=DEFAULT_DAMPING, power_iters=8, tol=1e-2))


def base_factory():
    return copy.deepcopy(world().base)


def run(model, requests, config: PipelineConfig = FAST, recipe=MEMORISED, heldout=None):
    w = world()
    return verified_erase(model, w.tokenizer, w.train, requests, w.heldout if heldout is None else heldout,
                          recipe=recipe, config=config, base_factory=base_factory)


def assert_publishable(outcome):
    assert outcome.verification is not None and outcome.verification.passed, outcome.verification.reason
    assert outcome.retained_after <= outcome.retained_bound
    assert all(outcome.guard.values()), outcome.guard
    for stage in ("influence_s", "verify_s", "guard_s", "total_s"):
        assert outcome.stages[stage] >= 0
    summary = outcome.summary()
    assert summary["verification"]["after"]["passed"] and summary["path"] == outcome.path


def test_memorised_records_are_erased_by_a_passing_adapter_within_the_guard():
    model = trained(MEMORISED)
    outcome = run(model, [request("remove", (erased_subject(),))])
    assert not outcome.verification_before.passed  # the original adapter recites them
    assert not outcome.verification_influence.passed  # the influence update alone cannot see them
    assert outcome.path in ("influence+remediation", "retrain")
    assert_publishable(outcome)
    assert outcome.verification.exposure_max < outcome.verification_before.exposure_max
    assert outcome.solver is not None and outcome.solver.converged


def test_a_non_memorised_adapter_publishes_straight_from_the_influence_update():
    model = trained(LIGHT)
    before = lora_vector(model)
    outcome = run(model, [request("remove", (erased_subject(),))], recipe=LIGHT)
    assert outcome.path == "influence"
    assert_publishable(outcome)
    assert outcome.remediation is None and outcome.retrain is None
    assert not torch.equal(lora_vector(model), before)  # the update was applied
    assert outcome.checks["affected_loss_after"] > outcome.checks["affected_loss_before"]


def test_a_correction_of_memorised_secrets_escalates_damping_and_passes():
    """b holds the corrections' large gradients: the first solve wrecks retained records, a damped
    one does not; the old answer's digits stay preferred until the span-targeted forgetting."""
    model = trained(MEMORISED)
    outcome = run(model, [request("correct_response", (erased_subject(),))])
    assert outcome.path in ("influence+remediation", "retrain")
    assert_publishable(outcome)
    assert outcome.verification.preference > 0
    assert outcome.verification.new_nll_median <= outcome.verification.learned_threshold
    assert [a["outcome"] for a in outcome.attempts][-1] == "ok" and len(outcome.attempts) >= 2


def test_nothing_failing_is_returned_without_the_fallbacks():
    w = world()
    model = trained(MEMORISED)
    stage = run_influence(model, w.tokenizer, w.train, [request("remove", (erased_subject(),))], FAST,
                          heldout=w.heldout)
    strict = PipelineConfig(solve=FAST.solve, remediate=False, retrain=False)
    with pytest.raises(VerificationFailedError, match="no adapter passed verification") as error:
        complete_erasure(model, w.tokenizer, stage, w.heldout, MEMORISED, strict)
    assert error.value.outcome is not None and not error.value.outcome.verification_influence.passed


def test_without_a_held_out_reference_it_refuses_or_marks_unverified():
    model = trained(LIGHT)
    requests = [request("remove", (erased_subject(),))]
    with pytest.raises(VerificationUnavailableError, match="could not verify"):
        run(copy.deepcopy(model), requests, recipe=LIGHT, heldout=[])
    lenient = PipelineConfig(solve=FAST.solve, require_verification=False)
    outcome = run(model, requests, config=lenient, recipe=LIGHT, heldout=[])
    assert outcome.path == "influence" and not outcome.verified
    assert outcome.summary()["verification"]["after"]["verifiable"] is False


def test_a_request_naming_only_held_out_records_leaves_the_adapter_unchanged():
    w = world()
    model = trained(LIGHT)
    before = lora_vector(model)
    target = w.heldout[0]
    outcome = run(model, [EditRequest(kind="remove", records=(target.id,), request_id="r-h")], recipe=LIGHT)
    assert outcome.path == "unchanged" and outcome.heldout_affected == [target.id] and not outcome.edits
    assert torch.equal(lora_vector(model), before)
