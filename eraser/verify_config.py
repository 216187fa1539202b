"""The membership test's thresholds (:class:`VerifyConfig`); what each one gates is the criterion in
:mod:`eraser.verify`'s docstring. Its own module so that the per-record scoring (:mod:`eraser.scoring`) and
the test can both take it without importing each other."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from eraser.errors import EraserError, require_counts


@dataclass(frozen=True)
class VerifyConfig:
    """The membership test's thresholds (the criterion: :mod:`eraser.verify`'s docstring)."""

    alpha: float = 0.05  # level of the group test and of the per-record test family (two-sided each)
    calibrate: bool = True  # score = log(NLL / NLL under the base model) (False: log NLL)
    min_k: float = 0.2  # Min-K% (Shi et al., 2024): fraction of least likely response tokens, reported
    # Bits of calibrated exposure an erased span may always have (and the bound where too few reference spans
    # exist for the predictive test). Exact retrains on TOFU reached 11.2 bits (the normal fit's tail is
    # noisy at 24 candidates); the demo's memorised account numbers 27-72.
    max_exposure: float = 16.0
    secret_candidates: int = 24  # re-drawn digit strings per secret-like span
    min_secret_digits: int = 4  # a response with at least this many secret digits holds a secret-like span
    format_probability: float = 0.5  # a digit the base model predicts this well is format, not secret
    preference_margin: float = 0.0  # nats/token the old pair may stay preferred by, beyond the base's
    # Test 5 is reported, not gating, by default: exact retrains on TOFU's corrections failed it (shift
    # -0.13: a retrain on the perturbed answers for 3 epochs still prefers the original's style).
    gate_preference: bool = False
    learned_quantile: float = 0.5  # new pairs' median score must be <= this quantile of the reference's
    min_reference: int = 5  # fewer reference records than this: cannot verify
    calibrate_exposure: bool = True  # base model (adapter disabled): find the slots, subtract its exposure
    secrets: bool = True  # exposures and extraction at all (False: the cheap likelihood-only pre-check)
    extraction_tokens: int = 48  # greedy tokens generated per record for the extraction test
    extraction_counterfactuals: int = 24  # never-trained subjects each question template is asked about
    # Reference records the secret tests score for their null, evenly spaced: this many records with a
    # digit run long enough to hold a span (exposure), and this many records (extraction). Each costs
    # 2 x (secret_candidates + 1) forward passes or a greedy decoding: most of the test's time.
    secret_reference: int = 48
    batch_size: int = 16
    generation_batch_size: int = 64  # prompts per greedy-decoding batch (decoding steps dominate the test)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise EraserError(f"alpha must be in (0, 1), got {self.alpha!r}")
        if not 0 < self.min_k <= 1:
            raise EraserError(f"min_k must be in (0, 1], got {self.min_k!r}")
        if not 0 < self.format_probability <= 1:
            raise EraserError(f"format_probability must be in (0, 1], got {self.format_probability!r}")
        if not 0 <= self.learned_quantile <= 1:
            raise EraserError(f"learned_quantile must be in [0, 1], got {self.learned_quantile!r}")
        require_counts(self, ("secret_candidates", "min_secret_digits", "min_reference", "batch_size",
                              "generation_batch_size", "secret_reference", "extraction_tokens",
                              "extraction_counterfactuals"))
        if self.max_exposure <= 0:
            raise EraserError(f"max_exposure must be > 0, got {self.max_exposure!r}")

    def to_dict(self) -> dict:
        return asdict(self)
