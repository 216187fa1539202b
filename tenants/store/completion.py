"""The store's half of a completeness check (``tenants.completion``): it reads HEAD's dataset, the
committed manifests and the bucket's hidden copies once for all the receipts checked."""

from __future__ import annotations

from tenants.completion import records_gone, versions_purged
from tenants.models import CompletionCheck, Head, Receipt
from tenants.store.base import StoreBase


class CompletionMixin(StoreBase):
    """Checks 1 and 2 of a complete erasure; check 3 (replicas) is the coordinator's, which knows the hooks."""

    def check_completion(self, tenant: str, head: Head, receipts: list[Receipt]
                         ) -> dict[str, tuple[CompletionCheck, CompletionCheck]]:
        """{request id: (records gone from HEAD's dataset, versions purged)}. A read that fails raises
        (StoreError): no check is ever taken as passed for want of an answer."""
        records = self.read_dataset(tenant, head.data)
        adapters, datasets = self._manifests(tenant, "adapter"), self._manifests(tenant, "data")
        leftovers = [version for _, _, version, _ in self.uncommitted(tenant)]
        hidden = self.hidden_copies(tenant)
        return {r.request_id: (records_gone(r, head.data, records),
                               versions_purged(r, adapters, datasets, head, leftovers, hidden)) for r in receipts}
