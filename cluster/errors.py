"""Typed errors of the cluster layer. Messages name the tenant, request or job concerned."""

from __future__ import annotations


class ClusterError(Exception):
    """Base of every error raised by ``cluster`` (the CLI prints these as one line)."""


class JobFailedError(ClusterError, RuntimeError):
    """A Ray Train job (or its in-process twin) died or gave no result: workers lost, retries spent."""


class GuardRejectedError(ClusterError):
    """A candidate adapter that must not be published (non-finite, unconverged, degrading retained
    records, still memorising the erased ones). ``checks`` holds the evidence for the receipt."""

    def __init__(self, message: str, checks: dict | None = None) -> None:
        super().__init__(message)
        self.checks = dict(checks or {})


class NotOnboardedError(ClusterError, LookupError):
    """A tenant without a live adapter (HEAD not set) or without records to train one on."""


class AlreadyOnboardedError(ClusterError):
    """Onboarding asked for a tenant that already has HEAD: from then on only erasures change it."""


class CoordinatorMismatchError(ClusterError):
    """The named coordinator of a tenant already runs against a different store (bucket or prefix)."""
