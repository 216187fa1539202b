"""Typed errors of the serving layer. Messages name the tenant, adapter or field concerned."""

from __future__ import annotations


class ServeError(Exception):
    """Base of every error raised by ``serve``."""


class ServeConfigError(ServeError, ValueError):
    """A serving option that cannot work (names the option and the value)."""


class EngineError(ServeError):
    """The inference engine failed a request for a reason that is not the client's input."""


class EngineInputError(EngineError, ValueError):
    """The engine refused a request's input (prompt too long, invalid sampling parameters)."""


class AdapterLoadError(ServeError):
    """An adapter version could not be downloaded or loaded into the engine."""


class NoAdapterError(ServeError, LookupError):
    """A tenant has no published adapter yet (HEAD.json missing), so there is nothing to serve."""
