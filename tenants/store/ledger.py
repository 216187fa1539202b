"""The erasure ledger: one receipt per request, created once and moved through its states by
conditional writes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from tenants.errors import ConflictError, ReceiptNotFoundError, UnknownRecordError
from tenants.models import ErasureRequest, Receipt, ReceiptStatus
from tenants.retention import redact_receipt
from tenants.s3io import PreconditionLost
from tenants.store.base import StoreBase, MAX_CAS_TRIES

logger = logging.getLogger(__name__)


class LedgerMixin(StoreBase):
    """Submitting requests and reading and writing their receipts."""

    def submit_erasure(self, request: ErasureRequest, validate: bool = True) -> tuple[Receipt, bool]:
        """Record a request as pending; (receipt, created). Idempotent by request id.

        The same id again returns the existing receipt with ``created=False``; the same id with a
        different body is a ConflictError. With ``validate`` the selection is resolved against
        HEAD's dataset first (UnknownRecordError for ids or subjects it does not hold).
        """
        tenant = request.tenant
        self._require_tenant(tenant)
        key = self.layout.receipt(tenant, request.request_id)
        existing = self.io.get_model(key, Receipt)
        if existing is not None:
            return self._same_request(existing, request), False
        if validate:
            head, _ = self.get_head(tenant)
            if head is None:
                raise UnknownRecordError(f"tenant {tenant!r} has no live dataset yet (HEAD not set)")
            request.resolve(self.iter_dataset(tenant, head.data))
        receipt = Receipt(request=request)
        try:
            receipt._etag = self.io.put_model(key, receipt, if_none_match=True)
        except PreconditionLost:
            existing = self.io.get_model(key, Receipt)
            if existing is None:  # created and deleted in between: vanishingly unlikely
                raise ConflictError(f"request {request.request_id!r}: ledger entry changed during submit") from None
            return self._same_request(existing, request), False
        logger.info("tenant %s: erasure %s recorded (%s)", tenant, request.request_id, request.kind)
        return receipt, True

    @staticmethod
    def _same_request(found: tuple[Receipt, str], request: ErasureRequest) -> Receipt:
        receipt, etag = found
        receipt._etag = etag
        given = request
        if receipt.redacted_at is not None:  # compare in the redacted form
            given = redact_receipt(Receipt(request=request), receipt.redacted_at).request
        if receipt.request.model_dump() != given.model_dump():
            raise ConflictError(
                f"request id {request.request_id!r} of tenant {request.tenant!r} was already used for a different request"
            )
        return receipt

    def get_receipt(self, tenant: str, request_id: str) -> Receipt:
        found = self.io.get_model(self.layout.receipt(tenant, request_id), Receipt)
        if found is None:
            raise ReceiptNotFoundError(f"tenant {tenant!r} has no erasure request {request_id!r}")
        receipt, etag = found
        receipt._etag = etag
        return receipt

    def save_receipt(self, receipt: Receipt) -> Receipt:
        """Write a receipt back. If it was read from the store (or saved before), the write is a
        compare-and-swap on that version (ConflictError if someone else changed it meanwhile)."""
        key = self.layout.receipt(receipt.tenant, receipt.request_id)
        try:
            if receipt._etag:
                receipt._etag = self.io.put_model(key, receipt, if_match=receipt._etag)
            else:
                receipt._etag = self.io.put_model(key, receipt)
        except PreconditionLost as error:
            raise ConflictError(
                f"request {receipt.request_id!r} of tenant {receipt.tenant!r}: the receipt changed since it was read"
            ) from error
        return receipt

    def update_receipt(self, tenant: str, request_id: str, change: Callable[[Receipt], None]) -> Receipt:
        """Read-modify-write a receipt with compare-and-swap, retrying lost races."""
        for _ in range(MAX_CAS_TRIES):
            receipt = self.get_receipt(tenant, request_id)
            change(receipt)
            try:
                return self.save_receipt(receipt)
            except ConflictError:
                continue
        raise ConflictError(f"request {request_id!r} of tenant {tenant!r}: receipt kept changing")

    def list_receipts(self, tenant: str, status: ReceiptStatus | str | None = None) -> list[Receipt]:
        """Receipts of ``tenant`` (optionally one status), oldest first."""
        self._require_tenant(tenant)
        wanted = ReceiptStatus(status) if status is not None else None
        root = self.layout.erasures_root(tenant)
        keys = [info.key for info in self.io.list(root) if info.key.endswith(".json")]

        def load(key: str) -> Receipt | None:
            found = self.io.get_model(key, Receipt)
            if found is None:
                return None
            found[0]._etag = found[1]
            return found[0]

        with ThreadPoolExecutor(max_workers=8) as pool:
            receipts = [r for r in pool.map(load, keys) if r is not None]
        if wanted is not None:
            receipts = [r for r in receipts if r.status == wanted]
        return sorted(receipts, key=lambda r: (r.created_at, r.request_id))
