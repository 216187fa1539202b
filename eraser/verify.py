"""The membership test run on every candidate adapter before it may be published (erasure flow, step 4).

Question asked: could an attacker who sees the candidate adapter tell the erased records from records
the adapter never trained on, *of the same kind*? The reference is the tenant's held-out split
(:mod:`eraser.reference`): an erased record whose subject the adapter no longer trains on is judged
against records of subjects it never saw; one whose subject stays, against held-out records of
trained subjects. Where a benchmark has the retrained adapter (the gold), ``verify(gold=...)`` reports
its NLL next to the candidate's; it takes no part in the decision (production has no gold).

**The score** of a record is ``log(NLL under the adapter / NLL under the base model)`` (adapter
disabled): how much the adapter taught the model about it, as the perplexity ratio of Carlini et al.
(USENIX Security 2021) compares a model with a reference model. It takes out how hard a record is
anyway (difficulty calibration, Watson et al., ICLR 2022), which is most of why records and subjects
differ. Measured on TOFU (800 records, 20 never-seen authors): the original adapter's forget01 records
sit 4.1 reference sds below never-seen ones and the retrain's 0.2 (the NLL difference: 3.7 and 0.3;
the plain NLL cannot tell an easy author from a remembered one); on the tests' memorised customers
(NLL 0.1, base 1.2) the ratio is -2.6 to -3.5 against about -0.3 for the retrain. ``calibrate=False``
scores ``log NLL``.

**The criterion** ("forgotten"), for removed records E (k of them) against their reference R, at
level ``alpha`` (the pipeline divides it by the number of decision looks it may take):
1. group: the mean score of E is R's, two-sided, under R's random-effects model (records cluster by
   subject, :mod:`eraser.clustered`); a group forgotten *past* never-seen records (what gradient
   ascent produces) fails as surely as one still remembered;
2. per record: each record's score within the predictive distribution of one more reference record,
   both tails at ``alpha / (2k)`` (Bonferroni): one memorised record among many fails alone;
3. secrets: no erased secret-like span (:mod:`eraser.secrets`) is more exposed (base-calibrated
   bits) than the reference's spans vary: upper tail of their predictive distribution at
   ``alpha / k``; with fewer than ``min_reference`` reference spans, <= ``max_exposure`` bits or the
   largest reference span's; a span at most ``max_exposure`` bits always passes;
4. extraction: prompted with its own question, greedy decoding gives back no more of an erased
   response, beyond what it says when the question is asked about never-trained subjects
   (:mod:`eraser.extraction`), than the reference's records vary (upper tail at ``alpha / k``; no more
   than the most of any reference record always passes); only records whose plain recall could fail
   are asked about never-trained subjects (:func:`_extraction_test`: same decision, less decoding).
   Reported beside it, not gating until calibrated against retrains: the fluency of the erased
   records' greedy answers (their NLL under the base model against the reference answers'), which
   tells a retrain's fluent made-up answer from an update that garbles the question's answer.
For ``correct_response`` edits the old answer is *not* expected to look never-seen: a retrain on the
corrected answer still finds an answer to the same question with the same facts likely (measured on
TOFU's perturbed answers: the gold's score on the old answers is -1.45 against -0.51 for never-seen
records), so tests 1-2 do not apply to it; what must hold instead:
5. preference (reported; gating only with ``gate_preference``, because exact retrains on TOFU's
   corrections failed it): the adapter moved the preference from the old to the new answer beyond
   the base's, ``mean_i [(nll(old) - nll(new)) - (nll_base(old) - nll_base(new))] >= -preference_margin``;
6. learned: the new pairs are learned like training records: median score(new) <= the
   ``learned_quantile`` of the reference's or the retained records' scores, whichever is higher;
and tests 3-4 with the old answer's recall counted beyond the new answer's, test 3 only over the digits
the correction changed (digit runs the new answer also holds are learned by a retrain on it:
:func:`eraser.secrets.kept_digits`). A ``modify_query`` edit
keeps its response (trained under the new prompt): only test 6 applies.

With fewer than ``min_reference`` reference records the test cannot decide: ``verifiable=False``,
``passed=False`` and a reason saying so; it never claims success without a reference.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import numpy as np

from eraser import clustered
from eraser.extraction import answer_fluency, extraction_recall, lcs_recall
from eraser.metrics import greedy_answers
from eraser.records import Record
from eraser.reference import evenly_spaced, member_pool, reference_pools, subject_key
from eraser.requests import Edit
from eraser.scoring import RecordStats, _mean, membership_scores, record_statistics
from eraser.secrets import DIGIT, kept_digits
from eraser.verify_config import VerifyConfig

logger = logging.getLogger(__name__)

# VerifyConfig, RecordStats and the scoring live in their own modules; importable from here as before.
__all__ = ["VerifyConfig", "VerifyResult", "RecordStats", "membership_scores", "record_statistics", "verify"]


@dataclass
class VerifyResult:
    """Every statistic of one membership test, ``passed`` and the reason."""

    passed: bool
    verifiable: bool
    reason: str
    erased: RecordStats
    heldout: RecordStats
    alpha: float | None = None  # the level this look was run at
    pools: dict = field(default_factory=dict)  # pool -> {"members", "reference", "fallback"}
    group_p: float | None = None  # smallest two-sided p of the group tests (one per pool)
    group_t: float | None = None
    group_auc: float | None = None  # attack AUC of "lower score = member" (0.5 = chance), reported
    record_p: list[float] = field(default_factory=list)  # per removed record, lower tail
    record_p_upper: list[float] = field(default_factory=list)  # per removed record, upper tail
    record_p_threshold: float | None = None  # alpha / (2k)
    exposure_max: float | None = None
    exposure_p: float | None = None  # smallest upper-tail p of an erased span (enough reference spans)
    exposure_threshold: float | None = None  # else: max(max_exposure, held-out records' exposures)
    extraction: list[float] = field(default_factory=list)  # per erased record, beyond what is said anyway
    # per erased record: True where ``extraction`` is exact, False where it is the record's plain recall (an
    # upper bound, below the pass bound: what is said anyway was not decoded, it could only lower it)
    extraction_exact: list[bool] = field(default_factory=list)
    extraction_p: float | None = None  # smallest upper-tail p among the erased records
    extraction_threshold: float | None = None  # the largest reference record's (passing below it always)
    # per removed record: base-model NLL/token of its greedy answer (reported, not gating); the reference's mean
    fluency: list[float] = field(default_factory=list)
    fluency_reference_mean: float | None = None
    fluency_p: float | None = None  # upper-tail p of the least fluent erased answer (clustered reference)
    fluency_ok: bool | None = None  # what a gating fluency test at alpha / k would say (not in ``checks``)
    preference: float | None = None  # base-calibrated mean nll(old) - nll(new) over corrected records
    new_score_median: float | None = None
    learned_threshold: float | None = None
    gold_nll_mean: float | None = None  # the erased records under the retrained adapter, if given
    checks: dict[str, bool] = field(default_factory=dict)  # criterion name -> held

    def to_dict(self) -> dict:
        body = asdict(self)
        body["erased"] = {**self.erased.summary(), "records": asdict(self.erased)}
        body["heldout"] = self.heldout.summary()
        return body

    def brief(self) -> dict:
        """The statistics a receipt or a summary line needs (no per-record lists)."""
        return {
            "passed": self.passed, "verifiable": self.verifiable, "reason": self.reason, "alpha": self.alpha,
            "erased_nll_mean": _mean(self.erased.nll), "erased_score_mean": _mean(self.erased.score),
            "heldout_score_mean": _mean(self.heldout.score), "reference_records": len(self.heldout.ids),
            "pools": self.pools, "group_p": self.group_p, "auc": self.group_auc,
            "min_record_p": min(self.record_p) if self.record_p else None,
            "min_record_p_upper": min(self.record_p_upper) if self.record_p_upper else None,
            "exposure_max": self.exposure_max, "exposure_p": self.exposure_p,
            "extraction_max": max(self.extraction) if self.extraction else None, "extraction_p": self.extraction_p,
            "extraction_threshold": self.extraction_threshold,
            "extraction_bounded": self.extraction_exact.count(False),
            "fluency_nll_mean": _mean(self.fluency), "fluency_reference_mean": self.fluency_reference_mean,
            "fluency_p": self.fluency_p, "fluency_ok": self.fluency_ok, "preference": self.preference,
            "new_score_median": self.new_score_median, "learned_threshold": self.learned_threshold,
            "checks": dict(self.checks),
        }



# -- the test -----------------------------------------------------------------------------------
def verify(
    model,
    tokenizer,
    edits: Sequence[Edit],
    heldout: Sequence[Record],
    config: VerifyConfig = VerifyConfig(),
    retained: Sequence[Record] = (),
    gold=None,
    trained_subjects: Iterable[str] | None = None,
) -> VerifyResult:
    """The membership test of ``model`` for ``edits`` against ``heldout`` (see the module docstring).

    ``retained``: a sample of records still trained on, for the "new pairs learned" level.
    ``trained_subjects``: the subjects the training set holds after the edits, which decide each erased
    record's reference (None: every record is judged against the whole reference).
    ``gold``: optionally the adapter retrained without the erased records (benchmarks); its mean NLL
    on the erased records is reported next to the candidate's (not part of the decision).
    """
    touched = {edit.old.id for edit in edits}
    reference = [r for r in heldout if r.id not in touched]
    member_edits = [edit for edit in edits if edit.kind != "modify_query"]  # whose old response must be gone
    members = [edit.old for edit in member_edits]
    population = [*members, *reference, *retained]
    kept = {edit.old.id: kept_digits(edit.old.response, edit.new.response)  # digits the correction keeps
            for edit in member_edits if edit.new is not None}
    erased = record_statistics(model, tokenizer, members, config, secrets=config.secrets, population=population,
                               kept=kept)
    secret_sample = evenly_spaced(reference, config.secret_reference)  # extraction's null
    with_digits = [r for r in reference if len(DIGIT.findall(r.response)) >= config.min_secret_digits]
    exposure_sample = evenly_spaced(with_digits, config.secret_reference)  # exposure's null
    held = record_statistics(model, tokenizer, reference, config, secrets=config.secrets, population=population,
                             secret_ids={r.id for r in exposure_sample})
    result = VerifyResult(passed=False, verifiable=True, reason="", erased=erased, heldout=held, alpha=config.alpha)
    if gold is not None and members:
        result.gold_nll_mean = float(np.mean(record_statistics(gold, tokenizer, members, config, secrets=False).nll))
    if len(reference) < config.min_reference:
        result.verifiable = False
        result.reason = (f"could not verify: {len(reference)} held-out reference record(s), at least "
                         f"{config.min_reference} needed (train with a held-out split, --heldout-fraction > 0)")
        return result

    removed = [edit.old for edit in member_edits if edit.kind == "remove"]
    if removed:
        _likelihood_tests(result, removed, reference, config, trained_subjects)
    if config.secrets and members:
        _secret_tests(model, tokenizer, result, member_edits, secret_sample, config)
    replaced = [edit for edit in edits if edit.new is not None]
    if replaced:
        _replacement_tests(model, tokenizer, result, replaced, retained, config)
    failed = [name for name, held_ in result.checks.items() if not held_]
    result.passed = not failed
    result.reason = ("forgotten: " if not failed else "still distinguishable (" + ", ".join(failed) + "): ") + \
        _describe(result)
    logger.info("membership test %s: %s", "passed" if result.passed else "failed", result.reason)
    return result


def _likelihood_tests(result: VerifyResult, removed: Sequence[Record], reference: Sequence[Record],
                      config: VerifyConfig, trained_subjects: Iterable[str] | None) -> None:
    """Tests 1-2 per reference pool (Bonferroni over pools)."""
    if trained_subjects is None:
        assignment = {r.id: "all" for r in removed}
        pools = {"all": list(reference)}
    else:
        trained = set(trained_subjects)
        assignment = {r.id: member_pool(r, trained) for r in removed}
        pools = reference_pools(reference, trained)
    used = sorted(set(assignment.values()))
    level = config.alpha / len(used)
    result.record_p_threshold = level / (2 * len(removed))
    group_ok, record_ok = True, True
    for pool in used:
        ids = [i for i, p in assignment.items() if p == pool]
        pool_ref = pools.get(pool, [])
        fallback = len(pool_ref) < config.min_reference
        if fallback:  # too few of the matching kind: the whole reference, and say so
            pool_ref = list(reference)
        ref = result.heldout.select(r.id for r in pool_ref)
        mine = result.erased.select(ids)
        components = clustered.variance_components(ref.score, ref.groups)
        p, t = clustered.group_test(mine.score, mine.groups, components)
        lower, upper = clustered.record_tests(mine.score, components)
        result.pools[pool] = {"members": len(ids), "reference": len(ref.ids), "reference_subjects": components.subjects,
                              "fallback_to_all": fallback, "group_p": p, "t": t}
        if result.group_p is None or p < result.group_p:
            result.group_p, result.group_t = p, t
        result.record_p += lower
        result.record_p_upper += upper
        group_ok &= p >= level
        record_ok &= min(lower + upper) >= result.record_p_threshold
    removed_stats = result.erased.select(r.id for r in removed)
    result.group_auc = clustered.attack_auc(removed_stats.score, result.heldout.score)
    result.checks["group"] = group_ok
    result.checks["per_record"] = record_ok


def _upper_tail_test(values: Sequence[float], values_groups: Sequence[str], reference: Sequence[float],
                     reference_groups: Sequence[str], level: float) -> tuple[bool, float]:
    """Per value, the upper tail under the reference's predictive distribution (clustered), Bonferroni:
    ``(every p >= level / k, smallest p)``. A record stands out only by more than the reference varies."""
    components = clustered.variance_components(reference, reference_groups)
    _, upper = clustered.record_tests(values, components)
    return min(upper) >= level / len(values), min(upper)


def _secret_tests(model, tokenizer, result: VerifyResult, member_edits: Sequence[Edit], reference: Sequence[Record],
                  config: VerifyConfig) -> None:
    """Tests 3-4: exposure of secret-like spans, and extraction by the record's own question. Each erased
    record against the predictive distribution of the reference's values (upper tail, Bonferroni over
    the erased records): the largest of k erased values grows with k, so comparing it with the largest
    of the reference's rejected exact retrains (measured on TOFU's forget05: extraction 0.71 against
    0.45). Exposure needs ``min_reference`` reference spans for that; with fewer, the bound is
    ``max_exposure`` bits or the largest reference span's."""
    spans = [(e, g) for e, g in zip(result.erased.exposure, result.erased.groups) if e is not None]
    if spans:
        reference_spans = [(e, g) for e, g in zip(result.heldout.exposure, result.heldout.groups) if e is not None]
        result.exposure_max = max(e for e, _ in spans)
        if len(reference_spans) >= config.min_reference:
            ok, p = _upper_tail_test([e for e, _ in spans], [g for _, g in spans], [e for e, _ in reference_spans],
                                     [g for _, g in reference_spans], config.alpha)
            result.exposure_p = p
            result.checks["exposure"] = ok or result.exposure_max <= config.max_exposure
        else:
            result.exposure_threshold = max([config.max_exposure, *(e for e, _ in reference_spans)])
            result.checks["exposure"] = result.exposure_max <= result.exposure_threshold
    _extraction_test(model, tokenizer, result, member_edits, reference, config)


def _extraction_test(model, tokenizer, result: VerifyResult, member_edits: Sequence[Edit],
                     reference: Sequence[Record], config: VerifyConfig) -> None:
    """Test 4. The test passes when every erased record's value is at most ``pass_bound``: the larger of
    the reference's largest value and the value whose predictive upper tail is ``alpha / k``. A record's
    recall of its own response bounds its value (what is said anyway only subtracts), so only records
    whose recall exceeds that bound are asked about never-trained subjects: the decision is the one the
    full computation gives, at a fraction of the decoding (on TOFU every question is its own template,
    each asked about ``extraction_counterfactuals`` subjects). ``extraction_exact`` says which values
    are exact and which are that upper bound."""
    members = [edit.old for edit in member_edits]
    erased_subjects = {r.subject for r in members}
    others = [r.subject for r in reference if r.subject not in erased_subjects]
    reference_answers = greedy_answers(model, tokenizer, [r.prompt_messages() for r in reference],
                                       config.extraction_tokens, config.generation_batch_size)
    null = extraction_recall(model, tokenizer, reference, config.extraction_tokens,
                             config.extraction_counterfactuals, others=others,
                             batch_size=config.generation_batch_size, answers=reference_answers)
    null_groups = [subject_key(r) for r in reference]
    result.extraction_threshold = max(null)
    level = config.alpha / len(members)
    pass_bound = max(result.extraction_threshold,
                     clustered.record_upper_bound(clustered.variance_components(null, null_groups), level))
    answers = greedy_answers(model, tokenizer, [r.prompt_messages() for r in members], config.extraction_tokens,
                             config.generation_batch_size)
    values = [lcs_recall(answer, r.response) for answer, r in zip(answers, members)]
    exact = [False] * len(members)
    for j, (edit, answer) in enumerate(zip(member_edits, answers)):
        if edit.new is not None:  # an old answer is given back only as far as it is not also the new one
            values[j] = max(0.0, values[j] - lcs_recall(answer, edit.new.response))
            exact[j] = True
    over = [j for j, value in enumerate(values) if value > pass_bound and not exact[j]]
    if over:
        excess = extraction_recall(model, tokenizer, [members[j] for j in over], config.extraction_tokens,
                                   config.extraction_counterfactuals, others=others,
                                   batch_size=config.generation_batch_size, answers=[answers[j] for j in over])
        for j, value in zip(over, excess):
            values[j], exact[j] = value, True
    result.extraction, result.extraction_exact = values, exact
    removed = [j for j, edit in enumerate(member_edits) if edit.kind == "remove"]
    if removed:  # a corrected question is answered with the new answer, which need not read like the reference's
        _fluency(model, tokenizer, result, [members[j] for j in removed], [answers[j] for j in removed],
                 [result.erased.groups[j] for j in removed], reference, reference_answers, null_groups, config)
    ok, result.extraction_p = _upper_tail_test(values, result.erased.groups, null, null_groups, config.alpha)
    # A record given back no more than the most of any never-trained one is no evidence either way.
    result.checks["extraction"] = ok or max(values) <= result.extraction_threshold


def _fluency(model, tokenizer, result: VerifyResult, removed: Sequence[Record], answers: Sequence[str],
             groups: Sequence[str], reference: Sequence[Record], reference_answers: Sequence[str],
             reference_groups: Sequence[str], config: VerifyConfig) -> None:
    """Reported, not gating (not yet calibrated against retrains): whether the removed records' greedy
    answers read like the answers about never-seen subjects (:func:`eraser.extraction.answer_fluency`),
    as the upper-tail p of the least fluent one under the reference's predictive distribution.
    Corrections are left out: exact retrains on the memorised tenant answer "That information is not
    available.", which reads unlike the reference's answers (4 of 4 flagged by calibrate_verify)."""
    result.fluency = answer_fluency(model, tokenizer, removed, answers, config.batch_size)
    null = answer_fluency(model, tokenizer, reference, reference_answers, config.batch_size)
    result.fluency_reference_mean = float(np.mean(null))
    if len(null) >= 2:
        result.fluency_ok, result.fluency_p = _upper_tail_test(result.fluency, groups, null, reference_groups,
                                                               config.alpha)


def _replacement_tests(model, tokenizer, result: VerifyResult, replaced: Sequence[Edit], retained: Sequence[Record],
                       config: VerifyConfig) -> None:
    """Tests 5-6: corrections preferred (beyond the base's preference), new pairs learned."""
    quiet = VerifyConfig(**{**config.to_dict(), "secrets": False})
    new = record_statistics(model, tokenizer, [e.new for e in replaced], quiet, secrets=False)
    corrections = [j for j, e in enumerate(replaced) if e.kind == "correct_response"]
    if corrections:
        # the old answers are erased members: their NLLs were measured with the erased records
        old = result.erased.select(replaced[j].old.id for j in corrections)
        shifts = [(o - b) - (new.nll[j] - new.base_nll[j]) if config.calibrate else o - new.nll[j]
                  for o, b, j in zip(old.nll, old.base_nll or old.nll, corrections)]
        result.preference = float(np.mean(shifts))
        if config.gate_preference:
            result.checks["preference"] = result.preference >= -config.preference_margin
    level = float(np.quantile(result.heldout.score, config.learned_quantile))
    if retained:
        kept = record_statistics(model, tokenizer, retained, quiet, secrets=False)
        level = max(level, float(np.quantile(kept.score, config.learned_quantile)))
    result.new_score_median = float(np.median(new.score))
    result.learned_threshold = level
    result.checks["learned"] = result.new_score_median <= level


def _describe(result: VerifyResult) -> str:
    parts = []
    if result.group_p is not None:
        parts.append(f"group p={result.group_p:.3g} (t {result.group_t:+.2f}, >= {result.alpha / max(1, len(result.pools)):g}), "
                     f"AUC {result.group_auc:.2f}")
        parts.append(f"record p lower={min(result.record_p):.3g} upper={min(result.record_p_upper):.3g} "
                     f"(>= {result.record_p_threshold:.3g})")
    if result.exposure_max is not None:
        parts.append(f"exposure {result.exposure_max:.1f} bits (" + (f"p {result.exposure_p:.3g}" if result.exposure_p
                     is not None else f"<= {result.exposure_threshold:.1f}") + ")")
    if result.extraction:
        parts.append(f"extraction {max(result.extraction):.2f} (p {result.extraction_p:.3g}; reference max "
                     f"{result.extraction_threshold:.2f})")
    if result.fluency:
        parts.append(f"answers' base NLL {_mean(result.fluency):.2f} (reference {result.fluency_reference_mean:.2f}"
                     + (f", p {result.fluency_p:.3g}" if result.fluency_p is not None else "") + "; reported)")
    if result.preference is not None:
        parts.append(f"old-new preference shift {result.preference:+.3f} (>= 0)")
    if result.new_score_median is not None:
        parts.append(f"new score median {result.new_score_median:.3f} (<= {result.learned_threshold:.3f})")
    return "; ".join(parts)
