"""Which superseded versions purge deletes: pure functions over manifests and the ledger.

A version *holds* the records of a published erasure R unless R is in its lineage:
``applied(adapter) = its request_ids | applied(parent adapter) | applied(its data version)`` and
``applied(data) = its request_ids | applied(parent data)``. A version is purged when it is not
protected (HEAD's, or the ones the caller keeps) and it lacks some R that went live (was
published) more than the grace period ago: the grace is the rollback window after R, not the
version's age. Versions that lack no published erasure are kept, whatever their age.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from tenants.models import AdapterManifest, DataManifest


@dataclass(frozen=True)
class PurgeCandidate:
    kind: str  # "adapter" | "data"
    version: str
    request_ids: tuple[str, ...]  # the published erasures whose records it still holds


def _applied(
    version: str | None,
    parents: Mapping[str, str | None],
    own: Mapping[str, frozenset[str]],
    extra: Mapping[str, frozenset[str]] | None,
    memo: dict[str, frozenset[str]],
) -> frozenset[str]:
    """Requests applied along the lineage of ``version`` (iterative, cycle-safe)."""
    chain: list[str] = []
    seen: set[str] = set()
    current = version
    while current is not None and current in own and current not in memo and current not in seen:
        seen.add(current)
        chain.append(current)
        current = parents.get(current)
    inherited = memo.get(current, frozenset()) if current is not None else frozenset()
    for name in reversed(chain):
        inherited = inherited | own[name] | (extra.get(name, frozenset()) if extra else frozenset())
        memo[name] = inherited
    return memo.get(version, frozenset()) if version is not None else frozenset()


def applied_requests(
    adapters: Mapping[str, AdapterManifest], datasets: Mapping[str, DataManifest]
) -> tuple[dict[str, frozenset[str]], dict[str, frozenset[str]]]:
    """Cumulative applied request ids per adapter version and per data version."""
    data_memo: dict[str, frozenset[str]] = {}
    data_parents = {v: m.parent for v, m in datasets.items()}
    data_own = {v: frozenset(m.request_ids) for v, m in datasets.items()}
    for version in datasets:
        _applied(version, data_parents, data_own, None, data_memo)
    adapter_parents = {v: m.parent_version for v, m in adapters.items()}
    adapter_own = {v: frozenset(m.request_ids) for v, m in adapters.items()}
    via_data = {v: data_memo.get(m.data_version, frozenset()) if m.data_version else frozenset() for v, m in adapters.items()}
    adapter_memo: dict[str, frozenset[str]] = {}
    for version in adapters:
        _applied(version, adapter_parents, adapter_own, via_data, adapter_memo)
    return adapter_memo, data_memo


def plan_purge(
    adapters: Mapping[str, AdapterManifest],
    datasets: Mapping[str, DataManifest],
    published: Mapping[str, datetime],
    protected: set[str],
    now: datetime,
    grace: timedelta,
) -> list[PurgeCandidate]:
    """The committed versions to delete, given the published erasures (request id -> published_at)."""
    due = {request_id for request_id, when in published.items() if when <= now - grace}
    if not due:
        return []
    adapter_applied, data_applied = applied_requests(adapters, datasets)
    plan: list[PurgeCandidate] = []
    for kind, versions, applied in (("adapter", adapters, adapter_applied), ("data", datasets, data_applied)):
        for version in sorted(versions):
            if version in protected:
                continue
            lacking = due - applied.get(version, frozenset())
            if lacking:
                plan.append(PurgeCandidate(kind, version, tuple(sorted(lacking))))
    return plan


def unapplied_at_head(
    adapters: Mapping[str, AdapterManifest],
    datasets: Mapping[str, DataManifest],
    published: Mapping[str, datetime],
    head_adapter: str | None,
    head_data: str | None,
) -> set[str]:
    """Published erasures missing from HEAD's lineage (should be empty; logged if not)."""
    adapter_applied, data_applied = applied_requests(adapters, datasets)
    missing: set[str] = set()
    if head_adapter is not None:
        missing |= set(published) - adapter_applied.get(head_adapter, frozenset())
    if head_data is not None:
        missing |= set(published) - data_applied.get(head_data, frozenset())
    return missing


# ---------------------------------------------------------------- receipts past retention

REDACTED = "[redacted]"


def redaction_digest(tenant: str, request_id: str, value: str) -> str:
    """``sha256:<hex>`` of a value a receipt no longer keeps in clear. Salted by tenant and request,
    so one who holds the value (the tenant, asked to prove a subject's erasure) can check it, while
    the digest is useless to look a name up across receipts."""
    import hashlib

    return "sha256:" + hashlib.sha256(f"{tenant}\x00{request_id}\x00{value}".encode()).hexdigest()[:32]


def redact_receipt(receipt, now: datetime):
    """The receipt with what identifies people replaced by digests: subject names (normalised), record
    ids, replacement text, the error text (it may quote them), and any string in ``checks``/``solver``
    equal to one of those. What proves the erasure stays: request id, kind, status, every timestamp,
    the versions before and after, the path, the statistics, the purge log. Sets ``redacted_at``."""
    from tenants.models import ErasureRequest, normalize_subject

    request = receipt.request

    def digest(value: str) -> str:
        return redaction_digest(request.tenant, request.request_id, value)

    sensitive = {value: digest(value) for value in [*(request.records or ()), *receipt.records_affected,
                                                    *(request.replacements or {})]}
    for subject in request.subjects or ():
        sensitive[subject] = sensitive[normalize_subject(subject)] = digest(normalize_subject(subject))
    data = request.model_dump(mode="json")
    if data.get("records"):
        data["records"] = [sensitive[r] for r in data["records"]]
    if data.get("subjects"):
        data["subjects"] = sorted({sensitive[s] for s in data["subjects"]})
    if data.get("replacements"):
        data["replacements"] = {sensitive[k]: {f: (None if t is None else digest(t)) for f, t in v.items()}
                                for k, v in data["replacements"].items()}

    def scrub(value):
        if isinstance(value, str):
            return sensitive.get(value, value)
        if isinstance(value, list):
            return [scrub(v) for v in value]
        if isinstance(value, dict):
            return {sensitive.get(k, k): scrub(v) for k, v in value.items()}
        return value

    redacted = receipt.model_copy(update={
        "request": ErasureRequest.model_validate(data),
        "records_affected": [sensitive[r] for r in receipt.records_affected],
        "checks": scrub(receipt.checks), "solver": scrub(receipt.solver),
        "error": REDACTED if receipt.error else None, "redacted_at": now,
    })
    redacted._etag = receipt._etag
    return redacted
