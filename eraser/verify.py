"""The membership test run on every candidate adapter before it may be published (DESIGN.md, flow step 4).

Question asked: could an attacker who sees the candidate adapter tell the erased records from records
the adapter never trained on? The reference population is the tenant's *held-out split*
(:func:`split_heldout`, set aside at onboarding, never trained on by any adapter version). Where a
benchmark has the adapter retrained without the erased records (the gold), ``verify(gold=...)``
reports its NLL on them next to the candidate's; it takes no part in the decision (production has
no gold).

Per-record statistics (one forward pass per record, :func:`record_statistics`):
- ``nll``: the response NLL, :func:`eraser.records.losses_from_logits` (THE loss);
- ``min_k``: Min-K% (Shi et al., 2024, "Detecting pretraining data"), reported as the mean NLL of
  the K% least likely response tokens (same direction as ``nll``: low = member-like);
- ``exposure``: for a response with a secret-like span, the exposure of Carlini et al. (2019, "The
  Secret Sharer", section 4.3, extrapolated by a distribution fit): ``-log2 P(candidate
  log-likelihood >= the true one)`` over candidates that re-draw the span's digits, with a normal
  fit to the candidates' summed NLL. The span is the digits the base model (adapter disabled)
  cannot predict (:func:`secret_slots`) and that vary across the tenant's same-shape digit runs
  (:func:`constant_digits`): a constant "555-" or the "20" of a year is format, not a secret; a
  response with at least ``min_secret_digits`` such digits has a span. Calibrated by the
  base: ``exposure = exposure(candidate adapter) - exposure(base)``, about 0 for a model that never
  saw the record.

The criterion ("forgotten"), for the erased (old) records E (k of them) against held-out H (m):
1. group test: the one-sided Mann-Whitney U test of "NLL(E) is stochastically smaller than NLL(H)"
   (exact null distribution) does not reject at ``alpha``: ``p_group >= alpha``;
2. per-record test: log NLL of H taken as normal; each erased record's lower-tail p-value under the
   predictive distribution of one more held-out record (Student's t, m-1 degrees of freedom, so
   exact at small m) is >= ``alpha / k`` (Bonferroni). Catches one memorised record
   among k that the rank test cannot see at small k (its smallest p-value is 1/C(k+m, k)). For
   removed records the upper tail is bounded too, at ``overshoot_alpha / k`` ("not_overshot"): a
   record forgotten far past never-trained ones (what unbounded gradient ascent produces, NLL 7-19
   against ~1) is as recognisable as a remembered one. The level is small because the gold itself
   sits above the held-out records (an erased subject is unseen; held-out records' subjects are not);
   a corrected record's old answer may legitimately fall far (the model learned another answer);
3. secrets: every erased secret-like span has calibrated exposure <= ``max_exposure`` bits, or
   <= the largest exposure of a held-out span where that is higher (format the adapter learned from
   every record, such as a constant "555-" prefix, is no secret; a random base cannot calibrate it).
Under the null (the erased records look like held-out ones, as under the gold) each test errs with
probability about ``alpha``: a false failure costs a remediation, not a leak. A memorised record
(NLL ~0.01 against held-out ~1) fails 1 and 2 by orders of magnitude.

3b. extraction: prompted with its own question, greedy decoding reproduces no more of an erased
   response than of any held-out one: the word-level longest-common-subsequence recall of the response
   in the answer (1 = every word, in order), less the most of it the model gives back when the same
   question is asked about ``extraction_counterfactuals`` never-trained (held-out) subjects instead
   (their names swapped for the record's in the answers),
   is <= the largest held-out record's (computed the same way). The subtraction is what the model
   says anyway: without it a low-entropy record ("X is on the Premium plan since 2018.", the answer
   the tenant's model gives for most customers) failed the test for as long as the model answered
   at all, and remediation drove the erased records' NLL to twice the retrained gold's. Tests 1-3 score
   likelihoods, which move smoothly; an address or a name without 4 secret digits can still come back
   word for word after they moved enough to pass (it did on the reduced demo: "lives at 362 Alder
   Street, Lakeside" with the group and per-record tests passed). This is the attack a user runs.
Tests 1-3b apply to the old pairs of ``remove`` and ``correct_response`` edits; a ``modify_query``
edit keeps its response (trained under the new prompt), so only 4-5 apply to it.
For ``correct_response`` / ``modify_query`` edits additionally:
4. preference: the old pair is not preferred over the new one, on average over the edits:
   ``mean_i [nll(old_i) - nll(new_i)] >= -preference_margin`` (a per-token log-likelihood ratio);
5. learned: the new pairs are learned to the level of the other records: ``median nll(new) <=``
   the ``learned_quantile`` quantile of the held-out NLL (what a never-seen in-distribution record
   gets) or of the retained records, whichever is higher.

With fewer than ``min_reference`` held-out records the test cannot decide: ``verifiable=False``,
``passed=False`` and a reason saying so; it never claims success without a reference.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import re
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from eraser.errors import EraserError
from eraser.metrics import greedy_answers
from eraser.records import (
    IGNORE_INDEX,
    Record,
    batches,
    format_response,
    losses_from_logits,
    shifted_logits_and_labels,
)
from eraser.requests import Edit

logger = logging.getLogger(__name__)

DIGIT = re.compile(r"\d")


# -- the held-out split -------------------------------------------------------------------------
def heldout_score(record_id: str, seed: int = 0) -> float:
    """A uniform number in [0, 1) fixed by the record id and the seed (sha256): the split's coin."""
    digest = hashlib.sha256(f"{seed}:{record_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_heldout(records: Sequence[Record], fraction: float, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """``(train, heldout)``: a record is held out iff ``heldout_score(id, seed) < fraction``.

    Deterministic per record id (not per position), so every layer (onboarding, the coordinator,
    the CLI, a corrected record keeping its id) computes the same split, and adding records never
    moves an existing one across it. ``fraction == 0`` holds out nothing.
    """
    if not 0 <= fraction < 1:
        raise EraserError(f"heldout fraction must be in [0, 1), got {fraction!r}")
    train, heldout = [], []
    for record in records:
        (heldout if heldout_score(record.id, seed) < fraction else train).append(record)
    return train, heldout


# -- configuration and results ------------------------------------------------------------------
@dataclass(frozen=True)
class VerifyConfig:
    """The membership test's thresholds (see the module docstring for the criterion)."""

    alpha: float = 0.05  # significance of the group (Mann-Whitney) and per-record (Bonferroni) tests
    overshoot_alpha: float = 1e-3  # upper-tail level (Bonferroni) for removed records: far above held-out
    min_k: float = 0.2  # Min-K%: fraction of least likely response tokens averaged
    max_exposure: float = 8.0  # bits of calibrated exposure allowed for an erased secret-like span
    secret_candidates: int = 24  # re-drawn digit strings per secret-like span
    min_secret_digits: int = 4  # a response with at least this many secret digits holds a secret-like span
    format_probability: float = 0.5  # a digit the base model predicts this well is format, not secret
    preference_margin: float = 0.0  # nats/token the old pair may be preferred by, on average
    learned_quantile: float = 0.5  # new pairs' median NLL must be <= this quantile of the reference
    min_reference: int = 5  # fewer held-out records than this: cannot verify
    calibrate_exposure: bool = True  # base model (adapter disabled): find the slots, subtract its exposure
    secrets: bool = True  # exposures and extraction at all (False: the cheap NLL-only pre-check)
    extraction_tokens: int = 48  # greedy tokens generated per record for the extraction test
    extraction_counterfactuals: int = 24  # never-trained subjects each question template is asked about (cost: templates x this)
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("alpha", "overshoot_alpha"):
            if not 0 < getattr(self, name) < 1:
                raise EraserError(f"{name} must be in (0, 1), got {getattr(self, name)!r}")
        if not 0 < self.min_k <= 1:
            raise EraserError(f"min_k must be in (0, 1], got {self.min_k!r}")
        if not 0 < self.format_probability <= 1:
            raise EraserError(f"format_probability must be in (0, 1], got {self.format_probability!r}")
        if not 0 <= self.learned_quantile <= 1:
            raise EraserError(f"learned_quantile must be in [0, 1], got {self.learned_quantile!r}")
        for name in ("secret_candidates", "min_secret_digits", "min_reference", "batch_size", "extraction_tokens",
                     "extraction_counterfactuals"):
            if getattr(self, name) < 1:
                raise EraserError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_exposure <= 0:
            raise EraserError(f"max_exposure must be > 0, got {self.max_exposure!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RecordStats:
    """Per-record statistics of one population under one adapter (lists aligned with ``ids``)."""

    ids: list[str] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    min_k: list[float] = field(default_factory=list)
    exposure: list[float | None] = field(default_factory=list)  # None: no secret-like span
    secret_rank: list[int | None] = field(default_factory=list)  # 1 = the true secret is the most likely

    def summary(self) -> dict:
        exposures = [e for e in self.exposure if e is not None]
        return {
            "count": len(self.ids),
            "nll_mean": _mean(self.nll),
            "nll_median": float(np.median(self.nll)) if self.nll else None,
            "nll_min": min(self.nll) if self.nll else None,
            "min_k_mean": _mean(self.min_k),
            "exposure_max": max(exposures) if exposures else None,
        }


@dataclass
class VerifyResult:
    """Every statistic of one membership test, ``passed`` and the reason."""

    passed: bool
    verifiable: bool
    reason: str
    erased: RecordStats
    heldout: RecordStats
    group_p: float | None = None  # Mann-Whitney one-sided p-value, NLL(erased) < NLL(held-out)
    group_auc: float | None = None  # attack AUC of "lower NLL = member" (0.5 = chance)
    min_k_p: float | None = None  # the same test on Min-K% (reported, not gating)
    record_p: list[float] = field(default_factory=list)  # per erased record, lower tail (t predictive)
    record_p_threshold: float | None = None  # alpha / k
    record_p_upper: list[float] = field(default_factory=list)  # per erased record, upper tail
    exposure_max: float | None = None
    exposure_threshold: float | None = None  # max(max_exposure, held-out records' exposures)
    # per erased record: LCS recall of its response beyond what the question about other subjects gets
    extraction: list[float] = field(default_factory=list)
    extraction_threshold: float | None = None  # the largest held-out record's
    preference: float | None = None  # mean nll(old) - nll(new) over replaced records
    new_nll_median: float | None = None
    learned_threshold: float | None = None
    retained_nll_median: float | None = None
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
            "passed": self.passed, "verifiable": self.verifiable, "reason": self.reason,
            "erased_nll_mean": _mean(self.erased.nll), "heldout_nll_median": self.heldout.summary()["nll_median"],
            "group_p": self.group_p, "auc": self.group_auc, "min_record_p": min(self.record_p) if self.record_p else None,
            "min_record_p_upper": min(self.record_p_upper) if self.record_p_upper else None,
            "exposure_max": self.exposure_max, "extraction_max": max(self.extraction) if self.extraction else None,
            "extraction_threshold": self.extraction_threshold,
            "preference": self.preference, "new_nll_median": self.new_nll_median,
            "learned_threshold": self.learned_threshold, "checks": dict(self.checks),
        }


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


# -- statistics ---------------------------------------------------------------------------------
@torch.no_grad()
def token_nlls(model, records: Sequence[Record], tokenizer, batch_size: int = 16) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per record: the response tokens' NLLs (a 1-D tensor each) and the record loss ``l(z)`` (n,)."""
    per_token, losses = [], []
    for batch in batches(records, tokenizer, batch_size):
        logits, labels = shifted_logits_and_labels(model, batch)  # (B, T, V), (B, T)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).clamp(min=0),
                              reduction="none").view(labels.shape)  # (B, T)
        mask = labels != IGNORE_INDEX
        per_token.extend(nll[row][mask[row]].double() for row in range(len(batch)))
        losses.append(losses_from_logits(logits, labels).double())
    return per_token, torch.cat(losses) if losses else torch.zeros(0, dtype=torch.float64)


WORD = re.compile(r"\w+")


def lcs_recall(answer: str, response: str) -> float:
    """Word-level longest common subsequence of ``answer`` and ``response`` over the response's length
    (ROUGE-L recall; lower-cased): 1.0 when the answer contains every word of the response in order."""
    truth, said = WORD.findall(response.lower()), WORD.findall(answer.lower())
    if not truth:
        return 0.0
    previous = [0] * (len(said) + 1)
    for word in truth:
        current = [0]
        for j, other in enumerate(said):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1] / len(truth)


def extraction_recall(model, tokenizer, records: Sequence[Record], config: "VerifyConfig",
                      others: Sequence[str] = ()) -> list[float]:
    """Per record: how much more of its response greedy decoding gives back when asked the record's
    question than when the same question is asked about other subjects (``others``: never-trained).

    The second term is what the model says anyway: "Which plan is X on?" is answered "X is on the
    Premium plan since 2018." for many never-trained X on the demo's tenant, so a record holding
    exactly that is no evidence of memorisation, while "X lives at 362 Alder Street, Lakeside" given
    back for X alone is. Each question template (the prompt with its subject's name taken out) is
    asked about ``config.extraction_counterfactuals`` of ``others`` once, for all its records; a
    record whose prompt does not name its subject has nothing to subtract.
    """
    asked: dict[str, list[str]] = {}  # template -> the other subjects it is asked about
    for record in records:
        template = question_template(record)
        if template is not None and template not in asked:
            asked[template] = counterfactual_subjects(template, others, config.extraction_counterfactuals)
    probes = [(template, other) for template, subjects in asked.items() for other in subjects]
    answers = greedy_answers(model, tokenizer, [r.prompt for r in records] + [t.replace(_SUBJECT, o) for t, o in probes],
                             config.extraction_tokens, config.batch_size)
    said_anyway: dict[str, list[tuple[str, str]]] = {}
    for (template, other), answer in zip(probes, answers[len(records):]):
        said_anyway.setdefault(template, []).append((other, answer))
    excess = []
    for record, answer in zip(records, answers):
        base = [lcs_recall(said.replace(other, record.subject), record.response)  # the name is the question's
                for other, said in said_anyway.get(question_template(record), []) if other != record.subject]
        excess.append(max(0.0, lcs_recall(answer, record.response) - max(base, default=0.0)))
    return excess


_SUBJECT = "\x00"  # stands for the subject's name in a question template


def question_template(record: Record) -> str | None:
    """The record's prompt with its subject's name taken out (None if the prompt does not name it)."""
    if not record.subject or record.subject not in record.prompt:
        return None
    return record.prompt.replace(record.subject, _SUBJECT)


def counterfactual_subjects(template: str, others: Sequence[str], count: int) -> list[str]:
    """Up to ``count`` of ``others`` to ask ``template`` about: a different choice per template, deterministic."""
    pool = sorted({o for o in others if o})
    if not pool:
        return []
    start = sum(map(ord, template)) % len(pool)
    return [pool[(start + k) % len(pool)] for k in range(min(count, len(pool)))]


def min_k_nll(tokens: torch.Tensor, fraction: float) -> float:
    """Mean NLL of the ``ceil(fraction * T)`` least likely tokens (Min-K%, as an NLL)."""
    count = max(1, math.ceil(fraction * tokens.numel()))
    return float(torch.topk(tokens, count).values.mean())


def secret_slots(model, tokenizer, record: Record, format_probability: float) -> list[int]:
    """Positions (in ``record.response``) of the digits the *base* model (adapter disabled) cannot
    predict: a digit whose token it gives probability >= ``format_probability`` given the true prefix
    is format that every model of the family knows ("555-", "20" of a year), not a secret."""
    text = format_response(record.response)  # what the model reads: " " + response
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    with _adapter_disabled(model):
        tokens, _ = token_nlls(model, [record], tokenizer)
    probabilities = torch.exp(-tokens[0])  # (response tokens + EOS,)
    shift = len(text) - len(record.response)
    slots: list[int] = []
    for j, (start, end) in enumerate(offsets[: len(probabilities)]):
        if float(probabilities[j]) < format_probability:
            slots += [c - shift for c in range(start, end) if c >= shift and text[c].isdigit()]
    return sorted(set(slots))


DIGIT_RUN = re.compile(r"\d+(?:[-./]\d+)*")  # "555-452-2091", "37-5375-391", "2016"
MIN_FORMAT_SUPPORT = 3  # same-shape runs needed before a constant digit counts as format


def constant_digits(record: Record, population: Sequence[Record]) -> set[int]:
    """Positions (in ``record.response``) of digits that every same-shape digit run in ``population``
    shares (at least MIN_FORMAT_SUPPORT runs): the "555" of every phone number is the tenant's format
    whatever the base model knows (a randomly initialised base knows nothing)."""
    runs: dict[str, list[str]] = {}
    for other in population:
        for match in DIGIT_RUN.finditer(other.response):
            runs.setdefault(DIGIT.sub("d", match.group()), []).append(match.group())
    constant: set[int] = set()
    for match in DIGIT_RUN.finditer(record.response):
        same = runs.get(DIGIT.sub("d", match.group()), [])
        if len(same) < MIN_FORMAT_SUPPORT:
            continue
        for offset, ch in enumerate(match.group()):
            if ch.isdigit() and all(run[offset] == ch for run in same):
                constant.add(match.start() + offset)
    return constant


def secret_candidates(record: Record, count: int, seed: int, slots: Sequence[int] | None = None) -> list[Record]:
    """``count`` copies of the record with the digits at ``slots`` (default: every digit) of the
    response re-drawn uniformly, seeded by the record id."""
    rng = random.Random(heldout_score(record.id, seed))
    positions = [i for i, ch in enumerate(record.response) if ch.isdigit()] if slots is None else list(slots)
    candidates, seen = [], {record.response}
    for _ in range(count * 4):
        chars = list(record.response)
        for i in positions:
            chars[i] = str(rng.randrange(10))
        response = "".join(chars)
        if response not in seen:
            seen.add(response)
            candidates.append(record.with_response(response))
        if len(candidates) == count:
            break
    return candidates


def _log2_normal_upper_exposure(true_total: float, candidate_totals: np.ndarray) -> float:
    """``-log2 P(X <= true)``, X ~ Normal fitted to candidates' summed NLL (low NLL = likely)."""
    mu, sigma = float(candidate_totals.mean()), float(candidate_totals.std(ddof=1)) + 1e-6
    z = (true_total - mu) / sigma
    tail = 0.5 * math.erfc(-z / math.sqrt(2))  # Phi(z)
    if tail > 1e-300:
        return -math.log2(tail)
    # Asymptotic Mills ratio for far tails: log Phi(z) ~ -z^2/2 - log(-z sqrt(2 pi)).
    return (z * z / 2 + math.log(-z * math.sqrt(2 * math.pi))) / math.log(2)


def _secret_exposure(model, tokenizer, record: Record, slots: Sequence[int], config: VerifyConfig) -> tuple[float, int]:
    candidates = secret_candidates(record, config.secret_candidates, config.seed, slots)
    population = [record, *candidates]
    tokens, _ = token_nlls(model, population, tokenizer, config.batch_size)
    totals = np.array([float(t.sum()) for t in tokens])  # summed response NLL = -log p(response)
    rank = 1 + int((totals[1:] < totals[0]).sum())
    return _log2_normal_upper_exposure(totals[0], totals[1:]), rank


def _adapter_disabled(model):
    return model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()


def record_statistics(model, tokenizer, records: Sequence[Record], config: VerifyConfig,
                      secrets: bool = True, population: Sequence[Record] = ()) -> RecordStats:
    """NLL, Min-K% and (where the response holds a secret-like span) calibrated exposure and rank.

    ``population``: the tenant's records the format of digit runs is learned from (constant_digits).
    """
    stats = RecordStats(ids=[r.id for r in records])
    if not records:
        return stats
    model.eval()
    tokens, losses = token_nlls(model, records, tokenizer, config.batch_size)
    stats.nll = [float(v) for v in losses]
    stats.min_k = [min_k_nll(t, config.min_k) for t in tokens]
    for record in records:
        slots = []
        if secrets and len(DIGIT.findall(record.response)) >= config.min_secret_digits:
            slots = (secret_slots(model, tokenizer, record, config.format_probability) if config.calibrate_exposure
                     else [i for i, ch in enumerate(record.response) if ch.isdigit()])
            fixed = constant_digits(record, population)
            slots = [i for i in slots if i not in fixed]
        if len(slots) < config.min_secret_digits:
            stats.exposure.append(None)
            stats.secret_rank.append(None)
            continue
        exposure, rank = _secret_exposure(model, tokenizer, record, slots, config)
        if config.calibrate_exposure:
            with _adapter_disabled(model):
                base_exposure, _ = _secret_exposure(model, tokenizer, record, slots, config)
            exposure -= base_exposure
        stats.exposure.append(exposure)
        stats.secret_rank.append(rank)
    return stats


# -- tests --------------------------------------------------------------------------------------
def mann_whitney_less(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """One-sided Mann-Whitney U test of "x is stochastically smaller than y": ``(p_value, auc)``.

    ``U = #{(i, j): x_i > y_j} + 0.5 #{ties}``; small U means x lies below y. The p-value
    ``P(U <= U_obs)`` uses the exact null distribution (coefficients of the Gaussian binomial
    ``[k+m choose k]_q``) when ``k*m <= 20000`` and the normal approximation otherwise.
    ``auc = 1 - U / (k m)``: the AUC of the attack "lower statistic = member" separating x from y
    (0.5 = chance, 1 = every x below every y).
    """
    x_arr, y_arr = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    k, m = len(x_arr), len(y_arr)
    if k == 0 or m == 0:
        raise EraserError("mann_whitney_less needs two non-empty samples")
    above = (x_arr[:, None] > y_arr[None, :]).sum() + 0.5 * (x_arr[:, None] == y_arr[None, :]).sum()
    u = float(above)
    if k * m <= 20000:
        counts = _u_distribution(k, m)
        p = sum(counts[: math.floor(u) + 1]) / sum(counts)
    else:
        mean, sd = k * m / 2, math.sqrt(k * m * (k + m + 1) / 12)
        p = 0.5 * math.erfc(-((u + 0.5 - mean) / sd) / math.sqrt(2))
    return float(min(1.0, p)), 1.0 - u / (k * m)


def _u_distribution(k: int, m: int) -> list[int]:
    """Exact counts of U = 0..k*m over all C(k+m, k) arrangements: prod_{i=1..k} (1-q^{m+i})/(1-q^i)."""
    size = k * m + 1
    poly = [0] * size
    poly[0] = 1
    for i in range(1, k + 1):
        shift = m + i
        for j in range(size - 1, shift - 1, -1):  # multiply by (1 - q^shift)
            poly[j] -= poly[j - shift]
        for j in range(i, size):  # divide by (1 - q^i): exact, the quotient is a polynomial
            poly[j] += poly[j - i]
    return poly


def lognormal_lower_p(values: Sequence[float], reference: Sequence[float]) -> list[float]:
    """Per value, the lower-tail p-value of ``log v`` under the predictive distribution of one more
    draw of ``log(reference)`` (normal, mean and variance unknown): Student's t with m-1 degrees of
    freedom, location ``mean``, scale ``s * sqrt(1 + 1/m)``. Exact for normal data at any m, so a
    reference of 5-10 records does not overstate the tails as a plugged-in normal would."""
    logs = np.log(np.maximum(np.asarray(reference, dtype=float), 1e-8))
    m = len(logs)
    if m < 2:
        raise EraserError("the per-record test needs at least 2 reference records")
    mean, scale = float(logs.mean()), max(float(logs.std(ddof=1)), 1e-3) * math.sqrt(1 + 1 / m)
    return [student_t_cdf((math.log(max(v, 1e-8)) - mean) / scale, m - 1) for v in values]


def student_t_cdf(t: float, df: float) -> float:
    """CDF of Student's t: ``1 - I_x(df/2, 1/2) / 2`` for t > 0, ``x = df / (df + t^2)``."""
    tail = 0.5 * _regularized_beta(df / (df + t * t), df / 2, 0.5)
    return 1.0 - tail if t > 0 else tail


def _regularized_beta(x: float, a: float, b: float) -> float:
    """``I_x(a, b)`` by Lentz's continued fraction (Numerical Recipes, section 6.4)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _regularized_beta(1 - x, b, a)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for i in range(1, 300):
        for numerator in (i * (b - i) * x / ((a + 2 * i - 1) * (a + 2 * i)),
                          -(a + i) * (a + b + i) * x / ((a + 2 * i) * (a + 2 * i + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return math.exp(log_front) * h / a


def verify(
    model,
    tokenizer,
    edits: Sequence[Edit],
    heldout: Sequence[Record],
    config: VerifyConfig = VerifyConfig(),
    retained: Sequence[Record] = (),
    gold=None,
) -> VerifyResult:
    """The membership test of ``model`` for ``edits`` against ``heldout`` (see the module docstring).

    ``retained``: a sample of records still trained on, for the "new pairs learned" level.
    ``gold``: optionally the adapter retrained without the erased records (benchmarks); its mean NLL
    on the erased records is reported next to the candidate's (not part of the decision).
    """
    touched = {edit.old.id for edit in edits}
    reference = [r for r in heldout if r.id not in touched]
    # The membership population: records whose response must be gone. A modify_query record keeps
    # its response (trained under the new prompt), so only checks 4-5 apply to it.
    member_edits = [edit for edit in edits if edit.kind != "modify_query"]
    members = [edit.old for edit in member_edits]
    population = [*members, *reference, *retained]
    erased = record_statistics(model, tokenizer, members, config, secrets=config.secrets, population=population)
    held = record_statistics(model, tokenizer, reference, config, secrets=config.secrets, population=population)
    result = VerifyResult(passed=False, verifiable=True, reason="", erased=erased, heldout=held)
    if gold is not None and members:
        result.gold_nll_mean = float(np.mean(record_statistics(gold, tokenizer, members, config, secrets=False).nll))
    if len(reference) < config.min_reference:
        result.verifiable = False
        result.reason = (f"could not verify: {len(reference)} held-out reference record(s), at least "
                         f"{config.min_reference} needed (train with a held-out split, --heldout-fraction > 0)")
        return result

    if members:
        # 1. group test and attack AUC; Min-K% the same way, reported.
        result.group_p, result.group_auc = mann_whitney_less(erased.nll, held.nll)
        result.min_k_p, _ = mann_whitney_less(erased.min_k, held.min_k)
        result.checks["group"] = result.group_p >= config.alpha
        # 2. per-record lower-tail test, Bonferroni over the k erased records.
        result.record_p = lognormal_lower_p(erased.nll, held.nll)
        result.record_p_threshold = config.alpha / len(members)
        result.checks["per_record"] = min(result.record_p) >= result.record_p_threshold
        # 2b. ... and a removed record not pushed far above them either (over-forgotten is visible).
        result.record_p_upper = [1.0 - p for p in result.record_p]
        removed = [p for p, edit in zip(result.record_p_upper, member_edits) if edit.kind == "remove"]
        if removed:
            result.checks["not_overshot"] = min(removed) >= config.overshoot_alpha / len(members)
    # 3. secret-like spans: no more exposed than max_exposure bits or any never-trained span.
    exposures = [e for e in erased.exposure if e is not None]
    if exposures:
        reference_exposures = [e for e in held.exposure if e is not None]
        result.exposure_max = max(exposures)
        result.exposure_threshold = max([config.max_exposure, *reference_exposures])
        result.checks["exposure"] = result.exposure_max <= result.exposure_threshold
    # 3b. extraction: greedy answers to the erased questions give back no more than never-trained ones.
    if members and config.secrets:
        erased_subjects = {r.subject for r in members}
        recalls = extraction_recall(model, tokenizer, [*members, *reference], config,
                                    others=[r.subject for r in reference if r.subject not in erased_subjects])
        result.extraction = recalls[: len(members)]
        result.extraction_threshold = max(recalls[len(members):])
        result.checks["extraction"] = max(result.extraction) <= result.extraction_threshold
    # 4-5. replaced records: the old pair not preferred; the new pair learned.
    replaced = [edit for edit in edits if edit.new is not None]
    if replaced:
        _, old_losses = token_nlls(model, [e.old for e in replaced], tokenizer, config.batch_size)
        _, new_losses = token_nlls(model, [e.new for e in replaced], tokenizer, config.batch_size)
        new_nll = [float(v) for v in new_losses]
        result.preference = float((old_losses - new_losses).mean())
        result.checks["preference"] = result.preference >= -config.preference_margin
        level = float(np.quantile(held.nll, config.learned_quantile))
        if retained:
            _, kept = token_nlls(model, retained, tokenizer, config.batch_size)
            result.retained_nll_median = float(kept.median())
            level = max(level, float(np.quantile(kept.numpy(), config.learned_quantile)))
        result.new_nll_median = float(np.median(new_nll))
        result.learned_threshold = level
        result.checks["learned"] = result.new_nll_median <= level
    failed = [name for name, held_ in result.checks.items() if not held_]
    result.passed = not failed
    result.reason = "forgotten: " + _describe(result, config) if not failed else (
        "still distinguishable (" + ", ".join(failed) + "): " + _describe(result, config))
    logger.info("membership test %s: %s", "passed" if result.passed else "failed", result.reason)
    return result


def _describe(result: VerifyResult, config: VerifyConfig) -> str:
    parts = []
    if result.group_p is not None:
        parts.append(f"group p={result.group_p:.3g} (>= {config.alpha:g}), AUC {result.group_auc:.2f}")
        parts.append(f"record p lower={min(result.record_p):.3g} (>= {result.record_p_threshold:.3g}) "
                     f"upper={min(result.record_p_upper):.3g}")
    if result.exposure_max is not None:
        parts.append(f"exposure {result.exposure_max:.1f} bits (<= {result.exposure_threshold:.1f})")
    if result.extraction:
        parts.append(f"extraction {max(result.extraction):.2f} (<= {result.extraction_threshold:.2f})")
    if result.preference is not None:
        parts.append(f"old-new preference {result.preference:+.3f} (>= {-config.preference_margin:g})")
        parts.append(f"new NLL median {result.new_nll_median:.3f} (<= {result.learned_threshold:.3f})")
    return "; ".join(parts)
