"""The membership test (eraser.verify, eraser.reference, eraser.clustered): the held-out split, the
statistics, and the criterion on real adapters: one that memorised customer secrets fails, the adapter
retrained without them passes.

The world (a tiny Llama pretrained on *other* customers' records, then LoRA on the tenant's) is built
once per session by :func:`world` and shared with ``test_pipeline.py``.
"""

from __future__ import annotations

import copy
import functools
import random
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy import stats

from cli.synthetic import customer_base, customer_records
from eraser import clustered
from eraser.errors import EraserError
from eraser.pipeline import restrict_requests
from eraser.records import Record
from eraser.reference import reference_pools, split_heldout, steering_split
from eraser.requests import EditRequest, apply_edits, merge_edits
from eraser.secrets import secret_candidates
from eraser.training import TrainConfig, add_lora, train_lora
from eraser.verify import VerifyConfig, verify

HELDOUT = 0.4  # mixed unit: about 20% of the customers held out whole, 20% of the others' records
# Memorising recipe: 40 epochs at a moderate lr (1e-2 is too noisy to memorise digits here).
MEMORISED = TrainConfig(rank=8, alpha=16, epochs=40, lr=5e-3, batch_size=4, seed=0)
# The production-like recipe: a few epochs, the adapter a small adaptation of the pretrained base.
LIGHT = TrainConfig(rank=8, alpha=16, epochs=3, lr=5e-3, batch_size=4, seed=0)
SPLIT_SEED = 0  # holds out 3 customers whole and 7 single records of the others
NO_SECRET = "That information is not available."


@dataclass(frozen=True)
class World:
    base: torch.nn.Module
    tokenizer: object
    records: list[Record]  # all the tenant's records
    train: list[Record]
    heldout: list[Record]


@functools.lru_cache(maxsize=None)
def world() -> World:
    torch.manual_seed(0)
    records = customer_records(10, 5, seed=3)  # 50 records: email, account, address, plan, phone
    base, tokenizer = customer_base(records)
    train, heldout = split_heldout(records, HELDOUT, seed=SPLIT_SEED)
    pools = reference_pools(heldout, {r.subject for r in train})
    assert len(pools["unseen"]) >= 5 and len(pools["seen"]) >= 3, "the split seed must hold out both kinds"
    return World(base=base, tokenizer=tokenizer, records=records, train=train, heldout=heldout)


@functools.lru_cache(maxsize=None)
def _trained(recipe: TrainConfig, drop: tuple[str, ...] = (), kind: str = "remove"):
    w = world()
    requests = [request(kind, drop)] if drop else []
    edited = apply_edits(w.train, edits_for(requests)) if drop else w.train
    model = add_lora(copy.deepcopy(w.base), recipe)
    train_lora(model, w.tokenizer, edited, recipe)
    return model.eval()


def trained(recipe: TrainConfig, drop: tuple[str, ...] = (), kind: str = "remove"):
    """A fresh copy of the adapter trained with ``recipe`` (without/with edited ``drop`` subjects)."""
    return copy.deepcopy(_trained(recipe, drop, kind))


def erased_subject() -> str:
    """The last customer whose five records (account number included) all fell in the training split."""
    w = world()
    held = {r.subject for r in w.heldout}
    return [r.subject for r in w.train if r.subject not in held][-1]


def request(kind: str, subjects: tuple[str, ...]) -> EditRequest:
    chosen = [r for r in world().records if r.subject in subjects]
    replacements = None
    if kind == "correct_response":
        replacements = {r.id: {"response": NO_SECRET} for r in chosen}
    if kind == "modify_query":
        replacements = {r.id: {"prompt": f"Tell me about customer number {i}."} for i, r in enumerate(chosen)}
    return EditRequest(kind=kind, subjects=subjects, replacements=replacements, request_id=f"req-{kind}")


def edits_for(requests):
    w = world()
    restricted, _ = restrict_requests(requests, w.train, w.heldout)
    return merge_edits(restricted, w.train)


# -- the split ----------------------------------------------------------------------------------
@pytest.mark.parametrize("unit", ["mixed", "record"])
def test_split_is_fixed_by_record_id_and_subject_not_by_position(unit):
    records = customer_records(20, 5, seed=1)
    train, heldout = split_heldout(records, 0.2, seed=0, unit=unit)
    assert 8 <= len(heldout) <= 35 and len(train) + len(heldout) == len(records)
    shuffled = records[::-1]
    assert {r.id for r in split_heldout(shuffled, 0.2, seed=0, unit=unit)[1]} == {r.id for r in heldout}
    more = records + customer_records(3, 5, seed=2, id_prefix="new")
    assert {r.id for r in heldout} <= {r.id for r in split_heldout(more, 0.2, seed=0, unit=unit)[1]}
    corrected = [r.with_response("corrected") for r in records]  # edits keep ids: same side of the split
    assert {r.id for r in split_heldout(corrected, 0.2, seed=0, unit=unit)[1]} == {r.id for r in heldout}
    assert split_heldout(records, 0.0, unit=unit)[1] == []
    assert {r.id for r in split_heldout(records, 0.2, seed=1, unit=unit)[1]} != {r.id for r in heldout}
    with pytest.raises(EraserError, match="fraction"):
        split_heldout(records, 1.0, unit=unit)


def test_the_mixed_split_holds_out_whole_subjects_and_single_records():
    records = customer_records(60, 5, seed=1)
    train, heldout = split_heldout(records, 0.2, seed=0)
    pools = reference_pools(heldout, {r.subject for r in train})
    whole = {r.subject for r in pools["unseen"]}
    assert len(whole) >= 2 and all(sum(r.subject == s for r in pools["unseen"]) == 5 for s in whole)
    assert len(pools["seen"]) >= 5 and not whole & {r.subject for r in pools["seen"]}
    with pytest.raises(EraserError, match="unit"):
        split_heldout(records, 0.2, unit="customer")


def test_steering_and_deciding_halves_share_no_subject():
    records = customer_records(9, 5, seed=2)
    steering, deciding = steering_split(records, seed=0)
    assert {r.subject for r in steering}.isdisjoint({r.subject for r in deciding})
    assert abs(len({r.subject for r in steering}) - len({r.subject for r in deciding})) <= 1
    assert steering_split(records[::-1], seed=0)[0] == steering[::-1]  # by subject, not by position


# -- the statistics -----------------------------------------------------------------------------
def _clustered_sample(rng, subjects: int, per_subject: int, between: float, within: float, shift: float = 0.0):
    values, groups = [], []
    for g in range(subjects):
        effect = rng.normal(0, between ** 0.5)
        values += list(shift + effect + rng.normal(0, within ** 0.5, per_subject))
        groups += [f"{shift}-{g}"] * per_subject
    return values, groups


def test_variance_components_recover_the_random_effects():
    rng = np.random.default_rng(0)
    values, groups = _clustered_sample(rng, 400, 20, between=0.05, within=0.09)
    fit = clustered.variance_components(values, groups)
    assert fit.between == pytest.approx(0.05, rel=0.2) and fit.within == pytest.approx(0.09, rel=0.05)
    assert fit.subjects == 400 and fit.df == 399


def test_group_and_record_tests_hold_their_level_on_clustered_null_data():
    """What a naive rank test gets wrong (records of one subject are correlated): under the null the
    clustered group test rejects at about its level, and the per-record tails match Student's t."""
    rng = np.random.default_rng(1)
    trials, rejections, naive = 400, 0, 0
    for _ in range(trials):
        ref, ref_groups = _clustered_sample(rng, 6, 20, between=0.05, within=0.09)
        erased, erased_groups = _clustered_sample(rng, 2, 20, between=0.05, within=0.09)
        p, _ = clustered.group_test(erased, erased_groups, clustered.variance_components(ref, ref_groups))
        rejections += p < 0.05
        naive += stats.mannwhitneyu(erased, ref).pvalue < 0.05
    assert rejections / trials <= 0.08  # binomial sd at 0.05 is 0.011
    assert naive / trials > 0.3  # treating 40 records of 2 subjects as 40 draws rejects the null often
    fit = clustered.variance_components([0.0, 1.0, 2.0, 3.0], ["a", "b", "c", "d"])  # no clustering
    lower, upper = clustered.record_tests([5.0], fit)
    scale = (fit.within + fit.mean_variance) ** 0.5
    assert lower[0] == pytest.approx(stats.t.cdf((5.0 - 1.5) / scale, 3)) and lower[0] + upper[0] == pytest.approx(1)


def test_a_shifted_group_is_rejected_in_either_direction():
    rng = np.random.default_rng(2)
    ref, ref_groups = _clustered_sample(rng, 8, 20, between=0.05, within=0.09)
    fit = clustered.variance_components(ref, ref_groups)
    for shift in (-1.5, 1.5):  # remembered / forgotten past never-seen records
        erased, erased_groups = _clustered_sample(rng, 2, 20, between=0.05, within=0.09, shift=shift)
        assert clustered.group_test(erased, erased_groups, fit)[0] < 0.01


def test_secret_candidates_redraw_every_digit_only():
    record = Record(id="r", prompt="q", response="Account 12-3456-789 of Ada.")
    candidates = secret_candidates(record, 10, seed=0)
    assert len(candidates) == 10 and len({c.response for c in candidates}) == 10
    for c in candidates:
        assert c.response != record.response
        assert [ch.isdigit() for ch in c.response] == [ch.isdigit() for ch in record.response]
        assert c.response.replace("-", "")[:8] == "Account "


def test_a_correction_keeps_the_digit_runs_its_new_answer_also_holds():
    from eraser.secrets import kept_digits

    old = "Born on 05/25/1930 in Tel Aviv; account 37-5375-391."
    kept = kept_digits(old, "Born on May 25, 1930 in Tel Aviv; account 37-5375-392.")
    assert "".join(old[i] for i in sorted(kept)) == "25" "1930" "37" "5375"  # not the 05 nor the 391
    assert kept_digits(old, "Nothing about it.") == set()
    assert kept_digits(old, old) == {i for i, ch in enumerate(old) if ch.isdigit()}
    assert kept_digits("Year 1930.", "Year 19301.") == set()  # a longer run is another number


def test_exposure_of_a_correction_counts_only_the_digits_it_changed():
    """A retrain on the corrected answer learns the digit runs both answers share, so they are never
    scored as the old answer's secret: with fewer than min_secret_digits changed, no exposure at all."""
    from eraser.secrets import kept_digits
    from eraser.verify import record_statistics

    w, config = world(), VerifyConfig()
    edit = next(e for e in edits_for([request("correct_response", (erased_subject(),))])
                if len(re.findall(r"\d", e.old.response)) >= 2 * config.min_secret_digits)
    *head, last = re.split(r"(\d+)", edit.old.response)[:-1]  # the last digit run, one digit changed
    new = "".join(head) + str((int(last) + 1) % 10 ** len(last)).zfill(len(last)) + edit.old.response.rsplit(last, 1)[1]
    kept = {edit.old.id: kept_digits(edit.old.response, new)}
    assert len(re.findall(r"\d", edit.old.response)) - len(kept[edit.old.id]) == len(last) < config.min_secret_digits
    model = trained(MEMORISED)
    full = record_statistics(model, w.tokenizer, [edit.old], config, population=w.train)
    partial = record_statistics(model, w.tokenizer, [edit.old], config, population=w.train, kept=kept)
    assert full.exposure[0] is not None and full.exposure[0] > config.max_exposure  # memorised: exposed
    assert partial.exposure[0] is None  # one changed run left: nothing secret the correction removes


# -- the criterion on real adapters -------------------------------------------------------------
def test_an_adapter_that_memorised_secrets_fails_and_the_retrained_one_passes():
    w, subject = world(), erased_subject()
    edits = edits_for([request("remove", (subject,))])
    assert len(edits) >= 3

    trained_after = {r.subject for r in apply_edits(w.train, edits)}
    memorised = verify(trained(MEMORISED), w.tokenizer, edits, w.heldout, trained_subjects=trained_after)
    assert memorised.verifiable and not memorised.passed
    assert memorised.pools["unseen"]["members"] == len(edits) and not memorised.pools["unseen"]["fallback_to_all"]
    assert not memorised.checks["group"]  # (3 reference customers: the per-record t has 2 df, wide tails)
    assert memorised.group_auc > 0.9  # erased records far more likely taught than never-seen customers'
    assert not memorised.checks["extraction"], "the records are recited: extraction must show"
    assert "still distinguishable" in memorised.reason

    gold = verify(trained(MEMORISED, (subject,)), w.tokenizer, edits, w.heldout, trained_subjects=trained_after)
    assert gold.passed, gold.reason
    assert gold.exposure_max is None or gold.exposure_max < memorised.exposure_max


def test_a_correction_must_be_learned_and_the_old_answer_not_given_back():
    w, subject = world(), erased_subject()
    edits = edits_for([request("correct_response", (subject,))])
    original = verify(trained(MEMORISED), w.tokenizer, edits, w.heldout)
    assert not original.passed and not original.checks["learned"] and not original.checks["extraction"]
    assert original.preference < 0 and "preference" not in original.checks  # reported, not gating
    assert "group" not in original.checks  # an old answer is not expected to look never-seen
    gold = verify(trained(MEMORISED, (subject,), "correct_response"), w.tokenizer, edits, w.heldout)
    assert gold.passed, gold.reason
    assert gold.preference > 0 and gold.new_score_median <= gold.learned_threshold
    strict = verify(trained(MEMORISED), w.tokenizer, edits, w.heldout, VerifyConfig(gate_preference=True))
    assert not strict.checks["preference"]


def test_without_a_reference_it_says_it_cannot_verify():
    w = world()
    edits = edits_for([request("remove", (erased_subject(),))])
    result = verify(_trained(LIGHT), w.tokenizer, edits, heldout=[])
    assert not result.verifiable and not result.passed
    assert result.reason.startswith("could not verify")
    few = verify(_trained(LIGHT), w.tokenizer, edits, w.heldout[:3], VerifyConfig(min_reference=5))
    assert not few.verifiable and not few.passed


def test_lcs_recall_counts_the_response_words_given_back_in_order():
    from eraser.extraction import lcs_recall

    response = "Quin Diaz lives at 362 Alder Street, Lakeside."
    assert lcs_recall("quin diaz lives at 362 alder street lakeside", response) == 1.0  # case, punctuation
    assert lcs_recall("Quin Diaz lives at 205 Elm Street, Ashford.", response) == 5 / 8  # the template only
    assert lcs_recall("Lakeside Street Alder 362", response) == 1 / 8  # order matters
    assert lcs_recall("", response) == 0.0 and lcs_recall("anything", "") == 0.0


def test_extraction_counts_only_what_the_model_does_not_say_about_never_trained_subjects(monkeypatch):
    """A recited answer the model gives for other customers too is no evidence; one it gives for this
    customer alone is (the name in a counterfactual answer is swapped back before comparing)."""
    import sys

    from eraser.extraction import counterfactual_subjects, extraction_recall, question_template
    from eraser.records import Record

    def answers(model, tokenizer, prompts, max_tokens, batch_size):  # the model's greedy answers
        said = []
        for messages in prompts:
            prompt = messages[-1]["content"]
            name = prompt.removeprefix("Which plan is ").removeprefix("Where does ").split(" on?")[0].split(" live?")[0]
            if prompt.startswith("Which plan"):
                said.append(f"{name} is on the Premium plan since 2018.")  # the answer for anyone
            else:
                said.append(f"{name} lives at 362 Alder Street, Lakeside." if name == "Quin Diaz"
                            else f"{name} lives at 205 Elm Street, Ashford.")
        return said

    monkeypatch.setattr(sys.modules["eraser.extraction"], "greedy_answers", answers)
    erased = [Record(id="p", subject="Quin Diaz", prompt="Which plan is Quin Diaz on?",
                     response="Quin Diaz is on the Premium plan since 2018."),
              Record(id="a", subject="Quin Diaz", prompt="Where does Quin Diaz live?",
                     response="Quin Diaz lives at 362 Alder Street, Lakeside."),
              Record(id="n", subject="", prompt="Any news?", response="None today.")]
    excess = extraction_recall(None, None, erased, 48, 24, others=["Uma Berg", "Vic Pope"])
    assert excess == [0.0, 1 - 5 / 8, 0.0]  # the plan: said for anyone; the address: the template only; no subject
    assert extraction_recall(None, None, erased[1:2], 48, 24, others=[]) == [1.0]  # nobody to compare with

    assert question_template(erased[0]) == "Which plan is \x00 on?" and question_template(erased[2]) is None
    chosen = counterfactual_subjects("Which plan is \x00 on?", ["b", "a", "c", "a", ""], 2)
    assert len(chosen) == 2 and set(chosen) <= {"a", "b", "c"}
    assert chosen == counterfactual_subjects("Which plan is \x00 on?", ["c", "b", "a"], 2)  # deterministic


def test_extraction_asks_about_other_subjects_only_for_records_that_could_fail(monkeypatch):
    """The extraction test decodes counterfactual questions only for erased records whose own recall is
    above the pass bound, and decides exactly as the full computation (every record's excess) does."""
    import sys

    from eraser import clustered
    from eraser.extraction import extraction_recall
    from eraser.records import Record
    from eraser.requests import Edit
    from eraser.scoring import RecordStats
    from eraser.verify import VerifyConfig, VerifyResult, _extraction_test

    rng = random.Random(7)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    recited = {"Quin Diaz"}  # the model still gives this subject's answers back word for word
    decoded: list[str] = []

    def answers(model, tokenizer, prompts, max_tokens, batch_size):
        said = []
        for messages in prompts:
            prompt = messages[-1]["content"]
            decoded.append(prompt)
            name, _, topic = prompt.partition(" asks about ")
            truth = f"{name} {topic} " + " ".join(words[: 2 + len(topic) % 5])
            if name in recited:
                said.append(truth)
            elif name.startswith("Ref"):  # a partial answer, as a never-trained subject gets
                said.append(" ".join(w for w in truth.split() if rng.random() < 0.4))
            else:  # an erased subject the model forgot
                said.append("I do not know.")
        return said

    monkeypatch.setattr(sys.modules["eraser.extraction"], "greedy_answers", answers)
    monkeypatch.setattr(sys.modules["eraser.verify"], "greedy_answers", answers)
    monkeypatch.setattr(sys.modules["eraser.verify"], "answer_fluency",  # garbled answers: many non-words
                        lambda model, tokenizer, records, said, batch: [float(a.count("@")) for a in said])

    def record(i, subject, topic):
        return Record(id=f"{subject}-{i}", subject=subject, prompt=f"{subject} asks about {topic}",
                      response=f"{subject} {topic} " + " ".join(words[: 2 + len(topic) % 5]))

    reference = [record(i, f"Ref {s}", f"topic{i}") for s in range(6) for i in range(4)]
    config = VerifyConfig(extraction_counterfactuals=3)
    for erased_subjects in (["Ann Lee", "Bo Chen"], ["Ann Lee", "Quin Diaz"]):
        members = [record(i, s, f"item{i}") for s in erased_subjects for i in range(5)]
        edits = [Edit(kind="remove", old=m, new=None) for m in members]
        stats = RecordStats(ids=[m.id for m in members], groups=[f"subject:{m.subject}" for m in members])
        result = VerifyResult(passed=False, verifiable=True, reason="", erased=stats, heldout=RecordStats())
        decoded.clear()
        rng.seed(1)
        _extraction_test(None, None, result, edits, reference, config)
        shortcut_decodes, shortcut_ok = len(decoded), result.checks["extraction"]

        # the full computation: every erased record's excess over what is said about other subjects
        rng.seed(1)
        null = extraction_recall(None, None, reference, 48, 3, others=[r.subject for r in reference])
        full = extraction_recall(None, None, members, 48, 3, others=[r.subject for r in reference])
        groups = [f"subject:{r.subject}" for r in reference]
        _, upper = clustered.record_tests(full, clustered.variance_components(null, groups))
        full_ok = min(upper) >= config.alpha / len(members) or max(full) <= max(null)
        assert shortcut_ok == full_ok
        assert all(v >= f - 1e-12 for v, f, exact in zip(result.extraction, full, result.extraction_exact)
                   if not exact)  # a bounded value is never below the exact one
        if "Quin Diaz" in erased_subjects:
            assert not shortcut_ok and any(result.extraction_exact)
        else:
            assert shortcut_ok and not any(result.extraction_exact)
            # the reference: its own answers, 4 question templates x 3 other subjects; the members: their own only
            assert shortcut_decodes == len(reference) + 4 * 3 + len(members)


def test_a_garbled_answer_reads_less_fluent_than_a_made_up_one():
    """The fluency measure on the pretrained base: a fluent answer with a made-up address scores well below
    the same answer garbled as the fast path garbled the demo's ("address@ac@ac@a")."""
    from eraser.extraction import answer_fluency

    w = world()
    record = next(r for r in w.records if "lives at" in r.response)
    fluent = record.response.replace(record.subject, "Zed Moor")  # an answer for someone else, word for word
    garbled = "The email address@ac@ac@ac@ac@a lives at at at 9 9 9"
    made_up, broken = answer_fluency(w.base, w.tokenizer, [record, record], [fluent, garbled])
    assert made_up + 1.0 < broken


def test_the_record_upper_bound_is_where_the_upper_tail_reaches_the_level():
    fit = clustered.variance_components([0.1, 0.3, 0.2, 0.5, 0.4, 0.9], ["a", "a", "b", "b", "c", "c"])
    bound = clustered.record_upper_bound(fit, 0.01)
    _, upper = clustered.record_tests([bound - 1e-9, bound + 1e-9], fit)
    assert upper[0] >= 0.01 > upper[1]
