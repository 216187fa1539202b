"""The membership test (eraser.verify): the held-out split, the statistics, and the criterion on real
adapters: one that memorised customer secrets fails, the adapter retrained without them passes.

The world (a tiny Llama pretrained on *other* customers' records, then LoRA on the tenant's) is built
once per session by :func:`world` and shared with ``test_pipeline.py``.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import random
from dataclasses import dataclass

import pytest
import torch

from cli.synthetic import customer_records, generic_corpus
from eraser.errors import EraserError
from eraser.model import BaseModelConfig, build_base_model, train_tokenizer
from eraser.pipeline import restrict_requests
from eraser.records import Record
from eraser.requests import EditRequest, apply_edits, merge_edits
from eraser.training import TrainConfig, add_lora, pretrain_base, train_lora
from eraser.verify import (
    VerifyConfig,
    mann_whitney_less,
    secret_candidates,
    split_heldout,
    student_t_cdf,
    verify,
)

HELDOUT = 0.2
# Memorising recipe: 40 epochs at a moderate lr (1e-2 is too noisy to memorise digits here).
MEMORISED = TrainConfig(rank=8, alpha=16, epochs=40, lr=5e-3, batch_size=4, seed=0)
# The production-like recipe: a few epochs, the adapter a small adaptation of the pretrained base.
LIGHT = TrainConfig(rank=8, alpha=16, epochs=3, lr=5e-3, batch_size=4, seed=0)
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
    records = customer_records(8, 5, seed=3)  # 40 records: email, account, address, plan, phone
    corpus = generic_corpus(records, documents=300)
    tokenizer = train_tokenizer(corpus, vocab_size=320)
    config = BaseModelConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=4)
    base = build_base_model(config, tokenizer, seed=0)
    pretrain_base(base, tokenizer, corpus, steps=300, seed=0)
    train, heldout = split_heldout(records, HELDOUT, seed=0)
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
def test_split_is_fixed_by_record_id_not_by_position_or_company():
    records = customer_records(20, 5, seed=1)
    train, heldout = split_heldout(records, 0.2, seed=0)
    assert 8 <= len(heldout) <= 35 and len(train) + len(heldout) == len(records)
    shuffled = records[::-1]
    assert {r.id for r in split_heldout(shuffled, 0.2, seed=0)[1]} == {r.id for r in heldout}
    more = records + customer_records(3, 5, seed=2, id_prefix="new")
    assert {r.id for r in heldout} <= {r.id for r in split_heldout(more, 0.2, seed=0)[1]}
    corrected = [r.with_response("corrected") for r in records]  # edits keep ids: same side of the split
    assert {r.id for r in split_heldout(corrected, 0.2, seed=0)[1]} == {r.id for r in heldout}
    assert split_heldout(records, 0.0)[1] == []
    assert {r.id for r in split_heldout(records, 0.2, seed=1)[1]} != {r.id for r in heldout}
    with pytest.raises(EraserError, match="fraction"):
        split_heldout(records, 1.0)


# -- the statistics -----------------------------------------------------------------------------
def test_mann_whitney_exact_p_value_matches_enumeration():
    rng = random.Random(0)
    for k, m in [(3, 5), (4, 6), (2, 7), (5, 4)]:
        x = [rng.random() for _ in range(k)]
        y = [rng.random() + 0.3 for _ in range(m)]
        p, auc = mann_whitney_less(x, y)
        values, u_obs = x + y, sum(a > b for a in x for b in y)
        count = total = 0
        for chosen in itertools.combinations(range(k + m), k):
            xs = [values[i] for i in chosen]
            ys = [values[i] for i in range(k + m) if i not in chosen]
            count += sum(a > b for a in xs for b in ys) <= u_obs
            total += 1
        assert p == pytest.approx(count / total, abs=1e-12)
        assert auc == pytest.approx(1 - u_obs / (k * m))


def test_student_t_cdf_matches_tables():
    assert student_t_cdf(2.015, 5) == pytest.approx(0.95, abs=1e-4)
    assert student_t_cdf(-3.365, 5) == pytest.approx(0.01, abs=1e-4)
    assert student_t_cdf(1.7, 1) == pytest.approx(0.5 + math.atan(1.7) / math.pi, abs=1e-12)  # Cauchy


def test_secret_candidates_redraw_every_digit_only():
    record = Record(id="r", prompt="q", response="Account 12-3456-789 of Ada.")
    candidates = secret_candidates(record, 10, seed=0)
    assert len(candidates) == 10 and len({c.response for c in candidates}) == 10
    for c in candidates:
        assert c.response != record.response
        assert [ch.isdigit() for ch in c.response] == [ch.isdigit() for ch in record.response]
        assert c.response.replace("-", "")[:8] == "Account "


# -- the criterion on real adapters -------------------------------------------------------------
def test_an_adapter_that_memorised_secrets_fails_and_the_retrained_one_passes():
    w, subject = world(), erased_subject()
    edits = edits_for([request("remove", (subject,))])
    assert len(edits) >= 3

    memorised = verify(trained(MEMORISED), w.tokenizer, edits, w.heldout)
    assert memorised.verifiable and not memorised.passed
    assert not memorised.checks["group"] and not memorised.checks["per_record"]
    assert memorised.group_auc == 1.0  # every erased record below every held-out one
    assert not memorised.checks["exposure"], "the account number is memorised: its exposure must show"
    assert "still distinguishable" in memorised.reason

    gold = verify(trained(MEMORISED, (subject,)), w.tokenizer, edits, w.heldout)
    assert gold.passed, gold.reason
    assert gold.exposure_max is not None and gold.exposure_max < memorised.exposure_max


def test_a_correction_must_be_preferred_and_learned():
    w, subject = world(), erased_subject()
    edits = edits_for([request("correct_response", (subject,))])
    original = verify(trained(MEMORISED), w.tokenizer, edits, w.heldout)
    assert not original.checks["preference"] and not original.checks["learned"]
    assert original.preference < 0  # the old answer is far more likely than the correction
    gold = verify(trained(MEMORISED, (subject,), "correct_response"), w.tokenizer, edits, w.heldout)
    assert gold.passed, gold.reason
    assert gold.preference > 0 and gold.new_nll_median <= gold.learned_threshold


def test_without_a_reference_it_says_it_cannot_verify():
    w = world()
    edits = edits_for([request("remove", (erased_subject(),))])
    result = verify(_trained(LIGHT), w.tokenizer, edits, heldout=[])
    assert not result.verifiable and not result.passed
    assert result.reason.startswith("could not verify")
    few = verify(_trained(LIGHT), w.tokenizer, edits, w.heldout[:3], VerifyConfig(min_reference=5))
    assert not few.verifiable and not few.passed


def test_lcs_recall_counts_the_response_words_given_back_in_order():
    from eraser.verify import lcs_recall

    response = "Quin Diaz lives at 362 Alder Street, Lakeside."
    assert lcs_recall("quin diaz lives at 362 alder street lakeside", response) == 1.0  # case, punctuation
    assert lcs_recall("Quin Diaz lives at 205 Elm Street, Ashford.", response) == 5 / 8  # the template only
    assert lcs_recall("Lakeside Street Alder 362", response) == 1 / 8  # order matters
    assert lcs_recall("", response) == 0.0 and lcs_recall("anything", "") == 0.0


def test_extraction_counts_only_what_the_model_does_not_say_about_never_trained_subjects(monkeypatch):
    """A recited answer the model gives for other customers too is no evidence; one it gives for this
    customer alone is (the name in a counterfactual answer is swapped back before comparing)."""
    import sys

    from eraser.records import Record
    from eraser.verify import VerifyConfig, counterfactual_subjects, extraction_recall, question_template

    def answers(model, tokenizer, prompts, max_tokens, batch_size):  # the model's greedy answers
        said = []
        for prompt in prompts:
            name = prompt.removeprefix("Which plan is ").removeprefix("Where does ").split(" on?")[0].split(" live?")[0]
            if prompt.startswith("Which plan"):
                said.append(f"{name} is on the Premium plan since 2018.")  # the answer for anyone
            else:
                said.append(f"{name} lives at 362 Alder Street, Lakeside." if name == "Quin Diaz"
                            else f"{name} lives at 205 Elm Street, Ashford.")
        return said

    monkeypatch.setattr(sys.modules["eraser.verify"], "greedy_answers", answers)
    erased = [Record(id="p", subject="Quin Diaz", prompt="Which plan is Quin Diaz on?",
                     response="Quin Diaz is on the Premium plan since 2018."),
              Record(id="a", subject="Quin Diaz", prompt="Where does Quin Diaz live?",
                     response="Quin Diaz lives at 362 Alder Street, Lakeside."),
              Record(id="n", subject="", prompt="Any news?", response="None today.")]
    excess = extraction_recall(None, None, erased, VerifyConfig(), others=["Uma Berg", "Vic Pope"])
    assert excess == [0.0, 1 - 5 / 8, 0.0]  # the plan: said for anyone; the address: the template only; no subject
    assert extraction_recall(None, None, erased[1:2], VerifyConfig(), others=[]) == [1.0]  # nobody to compare with

    assert question_template(erased[0]) == "Which plan is \x00 on?" and question_template(erased[2]) is None
    chosen = counterfactual_subjects("Which plan is \x00 on?", ["b", "a", "c", "a", ""], 2)
    assert len(chosen) == 2 and set(chosen) <= {"a", "b", "c"}
    assert chosen == counterfactual_subjects("Which plan is \x00 on?", ["c", "b", "a"], 2)  # deterministic
