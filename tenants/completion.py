"""Whether an erasure is complete: pure checks over HEAD's dataset, the committed versions and the receipt.

``published`` says the erasure's adapter is live; *complete* says its effects were verified, each
condition read from the store rather than assumed from the steps that ran:

1. records gone: HEAD's dataset holds none of the removed records; for a correction
   (``modify_query``, ``correct_response``) each corrected record holds this request's replacement in
   the corrected field, or is gone, so the old prompt or response is not what it holds;
2. versions purged: no committed version other than HEAD's lacks the erasure in its lineage (the rule
   purge deletes by, ``tenants.retention``), no version directory holds files without its commit
   marker, and on a versioned bucket no noncurrent copy or delete marker is left under the tenant's
   versions;
3. replicas switched: ``replicas_switched_at`` is set, or no serving hook is registered, which the
   check says instead of claiming a switch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import timedelta

from tenants.models import AdapterManifest, CompletionCheck, DataManifest, Head, Receipt, Record
from tenants.models.requests import _REPLACED_FIELD
from tenants.retention import plan_purge, redaction_digest


def _stored(receipt: Receipt) -> Callable[[str], str]:
    """How the receipt holds a record id or a text: in clear, or by its digest once redacted."""
    if receipt.redacted_at is None:
        return lambda value: value
    return lambda value: redaction_digest(receipt.tenant, receipt.request_id, value)


def records_gone(receipt: Receipt, data_version: str, records: Iterable[Record]) -> CompletionCheck:
    """Check 1 over ``records`` (HEAD's dataset, ``data_version``). A record corrected again by a later
    request fails it: its field holds neither value this receipt knows, and the check never guesses."""
    wanted = set(receipt.records_affected)
    if not wanted:
        return CompletionCheck(ok=False, detail="the receipt names no affected records to look for")
    stored = _stored(receipt)
    field = _REPLACED_FIELD.get(receipt.request.kind)
    replacements = receipt.request.replacements or {}

    def holds_old(record: Record, key: str) -> bool:
        if field is None:  # remove: being there at all is the fault
            return True
        replacement = getattr(replacements.get(key), field, None)
        current = record.question if field == "prompt" else record.answer
        return replacement is None or stored(current) != replacement

    left = sum(1 for record in records if (key := stored(record.id)) in wanted and holds_old(record, key))
    what = "erased record(s)" if field is None else f"corrected record(s) without their new {field}"
    if left:
        return CompletionCheck(ok=False, detail=f"{left} of {len(wanted)} {what} in HEAD's data {data_version}")
    return CompletionCheck(ok=True, detail=f"none of {len(wanted)} {what} in HEAD's data {data_version}")


def versions_purged(receipt: Receipt, adapters: Mapping[str, AdapterManifest], datasets: Mapping[str, DataManifest],
                    head: Head, leftovers: Sequence[str], hidden: int) -> CompletionCheck:
    """Check 2: what purge would still delete for this erasure alone (HEAD's versions kept, grace over) is
    nothing; no version directory holds files without its commit marker (``leftovers``: its lineage
    cannot be read, and a purge interrupted after the marker leaves exactly that); and ``hidden``
    (noncurrent object versions and delete markers under the tenant's versions) is 0."""
    when = receipt.published_at or receipt.updated_at
    left = plan_purge(adapters, datasets, {receipt.request_id: when}, {head.adapter, head.data}, when, timedelta(0))
    if left:
        return CompletionCheck(ok=False, detail=f"still held by {', '.join(c.version for c in left)}")
    if leftovers:
        return CompletionCheck(ok=False, detail=f"files of {', '.join(leftovers)} left without a commit marker")
    if hidden:
        return CompletionCheck(ok=False, detail=f"{hidden} hidden object version(s) left under the tenant's versions")
    return CompletionCheck(ok=True, detail=f"none of {len(adapters)} adapter and {len(datasets)} data version(s) "
                                           "holds them; no hidden copy")


def replicas_switched(receipt: Receipt, hooks_registered: bool) -> CompletionCheck:
    """Check 3. Without a serving hook the coordinator knows of no replica: that is recorded as such, so
    the receipt never reads as if a switch had been confirmed."""
    if receipt.replicas_switched_at is not None:
        return CompletionCheck(ok=True, detail=f"every serving replica switched at "
                                               f"{receipt.replicas_switched_at.isoformat()}")
    if not hooks_registered:
        return CompletionCheck(ok=True, detail="no serving hook registered: no replica known to switch")
    return CompletionCheck(ok=False, detail="not every serving replica confirmed the switch yet")
