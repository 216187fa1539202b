"""Typed errors of the tenant store. Every message names the tenant, field or key concerned.

``InvalidRecordsError``, ``InvalidRequestError`` and ``UnknownRecordError`` have namesakes in
``eraser.errors``: the store and the method each refuse their own inputs, and the layering forbids
``tenants`` and ``eraser`` to import each other (docs/architecture.md#layers), so neither can raise the
other's class. These are the ones the HTTP and CLI layers report; the method's refusals of an imported
adapter become these in one place, ``cluster/adapter_import.py``.
"""

from __future__ import annotations


class TenantError(Exception):
    """Base of every error raised by ``tenants``; the CLI prints these as one line."""


class InvalidNameError(TenantError, ValueError):
    """A name that would become part of an S3 key is empty, too long or could escape its prefix."""


class InvalidTenantNameError(InvalidNameError):
    """A tenant name that is not a lowercase DNS-label-like identifier."""


class InvalidVersionError(InvalidNameError):
    """An adapter or data version that does not have the store's format (``v000001``, ``d000001``)."""


class InvalidRequestIdError(InvalidNameError):
    """An erasure request id that cannot be used as a ledger key."""


class TenantNotFoundError(TenantError, LookupError):
    """No ``tenant.json`` for this tenant."""


class TenantExistsError(TenantError):
    """``create_tenant`` for a name that is already taken."""


class InvalidConfigError(TenantError, ValueError):
    """A tenant configuration (or other model input) that fails validation; one-line message."""


class InvalidRecordsError(TenantError, ValueError):
    """Malformed JSON Lines (the message names the line), invalid or duplicate records."""


class InvalidRequestError(TenantError, ValueError):
    """An erasure request that is well-formed JSON but inconsistent with the records it selects."""


class UnknownRecordError(TenantError, LookupError):
    """An erasure request names record ids (or subjects) that the tenant's dataset does not hold."""


class InvalidAdapterError(TenantError, ValueError):
    """A local adapter directory that cannot be published (missing weights or config)."""


class VersionNotFoundError(TenantError, LookupError):
    """No committed adapter, data or model version under that name."""


class ReceiptNotFoundError(TenantError, LookupError):
    """No ledger entry for that request id."""


class InvalidTransitionError(TenantError, ValueError):
    """A receipt status change the state machine does not allow (e.g. published -> running)."""


class HeadConflictError(TenantError):
    """``move_head`` lost a compare-and-swap: HEAD.json changed since its ETag was read."""


class ConflictError(TenantError):
    """A conditional write of a ledger entry or tenant.json lost a race, or a request id was reused."""


class ChecksumMismatchError(TenantError):
    """A downloaded object's sha256 differs from the one recorded when it was written."""


class AuthError(TenantError):
    """An API key that is malformed, unknown, revoked or belongs to another tenant."""


class StoreError(TenantError):
    """The S3 server refused or failed a request in a way the caller cannot fix by changing input."""


class EmbeddedServerError(TenantError):
    """The embedded SeaweedFS server could not be found, started or reached."""


class LeaseHeldError(TenantError):
    """Another coordinator holds the tenant's lease (it has not expired): this one waits or refuses."""


class LeaseLostError(TenantError):
    """This coordinator's lease expired and another took it over (a higher fencing token): stop writing."""
