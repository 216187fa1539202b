"""Typed errors of the method. Messages name the field and the value at fault.

``InvalidRecordsError``, ``InvalidRequestError`` and ``UnknownRecordError`` have namesakes in
``tenants.errors``: the method and the store each refuse their own inputs, and the layering forbids
``eraser`` and ``tenants`` to import each other (docs/architecture.md#layers), so neither can raise the
other's class. ``cluster/`` is where the method's refusals meet the store's: a job reports any
``EraserError`` as a failed result with its message (``cluster/jobs.py``), and the import check turns
them into the store's errors (``cluster/adapter_import.py``, the one such mapping).
"""


class EraserError(Exception):
    """Base of every error the user can act on (the CLI prints it as one line)."""


class InvalidRecordsError(EraserError, ValueError):
    """Training records that cannot be read: malformed JSON Lines, missing fields, duplicate ids."""


class InvalidRequestError(EraserError, ValueError):
    """An erasure request that is malformed: wrong kind, replacements missing or not allowed."""


class UnknownRecordError(InvalidRequestError, LookupError):
    """A request names record ids (or subjects) that are not in the tenant's records."""


class EmptySelectionError(InvalidRequestError):
    """A request selects no record at all."""


class AdapterMismatchError(EraserError):
    """An adapter that does not belong to the given base model (shapes, names or vocabulary differ)."""


class SolverDivergedError(EraserError, ArithmeticError):
    """The inverse-HVP solve produced non-finite values or a residual that keeps growing."""


class SolverNotConvergedError(EraserError, ArithmeticError):
    """The solve hit its iteration cap above the residual tolerance."""


class StaleCurvatureError(EraserError):
    """A cached curvature that belongs to another adapter version (or another parameter layout)."""


class VerificationFailedError(EraserError):
    """No candidate adapter passed the membership test and the guard: nothing may be published.

    ``outcome`` (an :class:`eraser.pipeline.ErasureOutcome`, possibly partial) holds the evidence.
    """

    def __init__(self, message: str, outcome=None):
        super().__init__(message)
        self.outcome = outcome


class VerificationUnavailableError(VerificationFailedError):
    """The membership test cannot decide: no (or too small a) held-out reference population."""


class UnsupportedAdapterError(EraserError):
    """A PEFT adapter using a feature the method does not handle (DoRA, trained embeddings, ...)."""


class UnsupportedModelError(EraserError, NotImplementedError):
    """A base model whose attention computes something the method's attention does not (attention sinks, ...)."""


def require_counts(config, names) -> None:
    """Every config's count fields (sizes, steps, ranks) must be >= 1: raise :class:`EraserError` naming
    the first that is not."""
    for name in names:
        if getattr(config, name) < 1:
            raise EraserError(f"{name} must be >= 1, got {getattr(config, name)!r}")
