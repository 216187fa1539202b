"""The per-tenant erasure coordinator: the only writer of a tenant's HEAD (docs/architecture.md#the-erasure-flow).

One coordinator per tenant serialises that tenant's erasures (a lock here, one named Ray actor per
tenant in :mod:`cluster.actors`); different tenants run in parallel. A round:

1. recover: receipts left ``running`` by a dead coordinator are completed when their adapter
   version was already committed (HEAD moved, or moved now by compare-and-swap), else re-queued;
2. batch: pending requests, oldest first, resolved against HEAD's dataset (invalid ones are
   ``rejected`` with the reason), up to ``max_batch`` and no record edited twice;
3. receipts ``pending -> running``; the job (Ray Train, a Ray task or in-process) solves, verifies, guards;
4. publish data version k+1 and adapter version k+1 (manifest: request ids, solver report, checks,
   path), then move HEAD by compare-and-swap; receipts ``published``;
5. notify serving (hooks), then purge superseded versions past the grace period; a receipt is stamped
   ``completed_at`` once its records are checked gone from HEAD's dataset, the versions that held them
   checked purged and its replicas' switch recorded (:meth:`ErasureCoordinator.complete_due`);
6. warm (the Ray actor, in the background): build the new HEAD's low-rank curvature (solver
   "eigen") with a curvature job, so the next erasure on it skips that cost. The coordinator holds it
   in memory only (the Ray object store), never in S3, and drops it as soon as HEAD moves past its
   version: it was estimated from that version's records.

A job that fails leaves the receipts ``failed`` with the error and publishes nothing: HEAD moves
only after both versions are committed, and only a moved HEAD makes anything live. The receipt is
written at every step.

Why one module of about 700 lines: the round, recovery, retries, switch re-drives and completeness
checks are one state machine over one tenant's receipts, under one lease and fencing token; cut
apart, each piece would have to re-derive the others' invariants.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator, Sequence

from tenants.errors import ConflictError, HeadConflictError, InvalidTransitionError, LeaseLostError, TenantError
from tenants.lease import TenantLease
from tenants.completion import replicas_switched
from tenants.models import (AdapterManifest, Completion, CompletionCheck, ErasureRequest, Head, Receipt, ReceiptStatus,
                            Record, utcnow)
from tenants.store import TenantStore

from cluster import metrics
from cluster.config import CoordinatorOptions
from cluster.errors import AlreadyOnboardedError, ClusterError, NotOnboardedError
from cluster.jobs import CurvatureJob, ErasureJob, JobResult, TrainingJob
from cluster.runners import JobRunner

logger = logging.getLogger(__name__)

# on_published(tenant, head) -> None, or {"switched_at": datetime|iso str} once every replica switched.
PublishHook = Callable[[str, Head], Any]


@dataclass
class _Planned:
    receipt: Receipt
    selected: list[str]  # record ids the request selects (resolve order)
    edits: list[str]  # the ids it edits in this batch (an earlier remove in the batch may own some)


def _without_personal_data(text: str, batch: Sequence[_Planned]) -> str:
    """``text`` with the batch's subject names and replacement texts blanked: a failure's reason goes to the
    receipt whole (redacted after its retention) but to the logs, which outlive every retention policy,
    without what identifies a data subject. Record ids stay (opaque keys the tenant chose)."""
    personal = set()
    for planned in batch:
        request = planned.receipt.request
        personal.update(request.subjects or ())
        for replacement in (request.replacements or {}).values():
            personal.update(t for t in (replacement.prompt, replacement.response) if t)
    for value in sorted(personal, key=len, reverse=True):  # longest first: a name inside another stays hidden
        text = text.replace(value, "<redacted>")
    return text


@dataclass
class BatchReport:
    """What one round did (for logs and the batch summary)."""

    request_ids: list[str] = field(default_factory=list)
    status: str = ""  # published | failed | requeued | skipped (taken by another round) | fenced (lease lost)
    adapter_version: str | None = None
    error: str | None = None


def retry_at(receipt: Receipt, options: CoordinatorOptions) -> float | None:
    """When a failed receipt is due for another attempt (epoch seconds), or None if it is final: the
    method refused it, or ``max_attempts`` attempts were made."""
    if receipt.status != ReceiptStatus.failed or not receipt.attempts:
        return None
    last = receipt.attempts[-1]
    if not last.get("transient") or len(receipt.attempts) >= options.max_attempts:
        return None
    wait = min(options.retry_backoff_max_s, options.retry_backoff_s * 2 ** (len(receipt.attempts) - 1))
    return datetime.fromisoformat(last["at"]).timestamp() + wait


class ErasureCoordinator:
    """Runs one tenant's erasures against the store with a job runner. Thread-safe; one round at a time."""

    def __init__(
        self,
        tenant: str,
        store: TenantStore,
        runner: JobRunner,
        options: CoordinatorOptions | None = None,
        hooks: Sequence[PublishHook] | Callable[[], Iterable[PublishHook]] = (),
        heartbeat_dir: str | None = None,
    ) -> None:
        self.tenant = tenant
        self.store = store
        self.runner = runner
        self.options = options or CoordinatorOptions()
        self._hooks = hooks
        self.heartbeat_dir = heartbeat_dir
        self._lock = threading.RLock()
        self.batches: list[BatchReport] = []
        # HEAD's warmed curvature: ((adapter, data) versions it was built on, the runner's handle to it).
        self._curvature: tuple[tuple[str, str], Any] | None = None
        # The tenant's lease in S3: held while this coordinator works, so a second one waits or refuses.
        self.lease = TenantLease(store, tenant, ttl_s=self.options.lease_ttl_s, wait_s=self.options.lease_wait_s)
        self._lease_depth = 0

    @contextmanager
    def _leased(self) -> Iterator[int]:
        """Hold the tenant's lease (re-entrant; under the round lock): acquired on the way in (waiting up
        to ``lease_wait_s``, then LeaseHeldError), released on the way out of the outermost use."""
        with self._lock:
            if self._lease_depth == 0:
                self.lease.acquire()
            self._lease_depth += 1
            try:
                yield self.lease.token
            finally:
                self._lease_depth -= 1
                if self._lease_depth == 0:
                    self.lease.release()

    # ============================================================ public
    def submit(self, request: ErasureRequest | Receipt | dict) -> Receipt:
        """Record a request in the ledger as pending (idempotent by request id); processing is separate."""
        if isinstance(request, Receipt):
            request = request.request
        if not isinstance(request, ErasureRequest):
            request = ErasureRequest.model_validate(request)
        if request.tenant != self.tenant:
            raise ClusterError(f"request {request.request_id!r} is for tenant {request.tenant!r}, "
                               f"not this coordinator's {self.tenant!r}")
        receipt, created = self.store.submit_erasure(request, validate=False)
        if created:
            logger.info("tenant %s: request %s recorded (pending)", self.tenant, request.request_id)
        return receipt

    def run_until_idle(self, max_rounds: int | None = None) -> list[BatchReport]:
        """Recover, then run batches until nothing is pending; then purge what is due. Holds the lease."""
        with self._leased():
            reports: list[BatchReport] = []
            self.recover()
            self.retry_due()
            rounds = 0
            while max_rounds is None or rounds < max_rounds:
                report = self.run_once()
                if report is None:
                    break
                reports.append(report)
                rounds += 1
                if report.status == "fenced":
                    return reports
            self.purge_due()
            self.redrive_switches()
            self.complete_due()
            return reports

    def retry_due(self, now: float | None = None) -> list[str]:
        """Failed receipts whose last attempt failed for a transient reason go back to pending once their
        backoff (``retry_backoff_s * 2**(attempts-1)``, at most ``retry_backoff_max_s``) has passed, while
        fewer than ``max_attempts`` attempts were made. Returns the ids re-queued."""
        with self._leased():
            now = time.time() if now is None else now
            retried = []
            for receipt in self.store.list_receipts(self.tenant, ReceiptStatus.failed):
                due = retry_at(receipt, self.options)
                if due is None or due > now:
                    continue
                count = len(receipt.attempts)
                self._update(receipt.request_id, lambda r, n=count: r.transition(
                    ReceiptStatus.pending, error=f"retry {n + 1} of {self.options.max_attempts} after: {r.error}",
                    attempts=[*r.attempts[:-1], {**r.attempts[-1], "retried_at": datetime.now(timezone.utc).isoformat()}]))
                logger.info("tenant %s: request %s re-queued for attempt %d of %d", self.tenant, receipt.request_id,
                            count + 1, self.options.max_attempts)
                retried.append(receipt.request_id)
            return retried

    def redrive_switches(self) -> list[str]:
        """Published receipts whose replicas had not confirmed the switch ``redrive_after_s`` after
        publishing: notify HEAD again and stamp ``replicas_switched_at`` once every hook says so. Receipts
        of an older adapter than HEAD's are stamped too: a replica that switched to HEAD serves nothing
        else, so it holds no receipt's old adapter but HEAD's own. Returns the ids stamped."""
        with self._leased():
            if not self.hooks():
                return []
            head, _ = self.store.get_head(self.tenant)
            if head is None:
                return []
            cutoff = time.time() - self.options.redrive_after_s
            waiting = [r for r in self.store.list_receipts(self.tenant, ReceiptStatus.published)
                       if r.replicas_switched_at is None and r.old_adapter_version != head.adapter
                       and r.published_at is not None and r.published_at.timestamp() <= cutoff]
            if not waiting:
                return []
            switched = self._notify(head, [r.request_id for r in waiting])
            if switched is None:
                return []
            for receipt in waiting:
                self._update(receipt.request_id, lambda r: r.update(replicas_switched_at=switched))
            return [r.request_id for r in waiting]

    def complete_due(self) -> list[str]:
        """Check every published receipt not yet complete (:mod:`tenants.completion`) and stamp
        ``completed_at`` on those whose three checks all hold; the checks go on the receipt either way,
        so it says what was verified. Receipts still in their purge grace are skipped (their superseded
        versions are kept on purpose: nothing to check yet). A read that fails records nothing (the next
        round checks again). Returns the ids stamped."""
        with self._leased():
            head, _ = self.store.get_head(self.tenant)
            cutoff = time.time() - self._grace_s()
            waiting = [r for r in self.store.list_receipts(self.tenant, ReceiptStatus.published)
                       if r.completed_at is None and r.published_at is not None and r.published_at.timestamp() <= cutoff]
            if head is None or not waiting:
                return []
            try:
                checked = self.store.check_completion(self.tenant, head, waiting)
            except TenantError as error:
                logger.warning("tenant %s: completeness not checked (retried next round): %s", self.tenant, error)
                return []
            hooks = bool(self.hooks())
            return [receipt.request_id for receipt in waiting
                    if self._record_completion(receipt.request_id, *checked[receipt.request_id], hooks)]

    def _record_completion(self, request_id: str, records: CompletionCheck, versions: CompletionCheck,
                           hooks: bool) -> bool:
        """Write the checks on the receipt, with ``completed_at`` when all three hold; the replica check
        reads the receipt as written now (a switch may have been stamped since the listing)."""
        def change(r: Receipt) -> None:
            if r.completed_at is not None:  # complete is final: a later check never rewrites what was verified
                return
            completion = Completion(checked_at=utcnow(), records_gone=records, versions_purged=versions,
                                    replicas_switched=replicas_switched(r, hooks))
            r.update(completion=completion, **({"completed_at": completion.checked_at} if completion.ok else {}))

        try:
            receipt = self._update(request_id, change)
        except TenantError as error:  # evidence only: the next round checks again
            logger.warning("tenant %s: could not record the completeness of %s: %s", self.tenant, request_id, error)
            return False
        if receipt.completed_at is not None:
            logger.info("tenant %s: request %s verified complete", self.tenant, request_id)
        return receipt.completed_at is not None

    def warm_curvature(self) -> bool:
        """Build HEAD's low-rank curvature now, so the next erasure on it skips that cost (solver "eigen").

        A long-lived coordinator (the Ray actor) calls this in the background after its rounds and after
        onboarding. Best effort: a failure is logged and the next erasure job builds the curvature itself.
        Returns whether a curvature was built.
        """
        solve = self.options.pipeline.solve
        if not self.options.warm_curvature or solve.solver != "eigen":
            return False
        with self._lock:
            head, _ = self.store.get_head(self.tenant)
            if head is None or self._warmed(head) is not None:
                return False
            started = time.perf_counter()
            job = CurvatureJob(tenant=self.tenant, store_settings=self.store.settings, adapter_version=head.adapter,
                               data_version=head.data, solve=solve, job_id=uuid.uuid4().hex[:8],
                               heartbeat_dir=self.heartbeat_dir)
            try:
                with self.runner.run_curvature_job(job) as result:
                    curvature = result.load_curvature() if result.ok else None
                    error = result.error
            except Exception as failure:  # noqa: BLE001 (a lost worker: the erasure job builds it instead)
                curvature, error = None, str(failure)
            if curvature is None:
                logger.warning("tenant %s: warming the curvature of %s failed (the next erasure builds it): %s",
                               self.tenant, head.adapter, error)
                return False
            self._curvature = ((head.adapter, head.data), self.runner.share(curvature))
            logger.info("tenant %s: curvature of adapter %s warmed (rank %d, %.1fs)", self.tenant, head.adapter,
                        curvature.rank, time.perf_counter() - started)
            return True

    @property
    def warmed_version(self) -> str | None:
        """The adapter version whose curvature is warm, if any."""
        return self._curvature[0][0] if self._curvature is not None else None

    def _warmed(self, head: Head) -> Any:
        """The runner's handle to ``head``'s warmed curvature, or None. A curvature of any other version
        is dropped here: it was estimated from that version's records, erased ones included."""
        if self._curvature is not None and self._curvature[0] != (head.adapter, head.data):
            self._curvature = None
        return self._curvature[1] if self._curvature is not None else None

    def run_once(self) -> BatchReport | None:
        """One batch of pending requests, or None when nothing is pending (or nothing can run)."""
        with self._leased():
            plan = self._plan()
            if plan is None:
                return None
            head, etag, records, batch = plan
            report = self._run_batch(head, etag, records, batch)
            self.batches.append(report)
            return report

    def onboard(self, data_version: str | None = None) -> str:
        """Train the tenant's first adapter (a training job) on ``data_version`` (default: the newest),
        publish it as the first adapter version and create HEAD. Returns the adapter version."""
        with self._leased():
            head, _ = self.store.get_head(self.tenant)
            if head is not None:
                raise AlreadyOnboardedError(f"tenant {self.tenant!r} already has HEAD (adapter {head.adapter}); "
                                        "erasures, not training, change it from here")
            if data_version is None:
                versions = self.store.list_data_versions(self.tenant)
                if not versions:
                    raise NotOnboardedError(f"tenant {self.tenant!r} has no data version to train on (upload records first)")
                data_version = versions[-1]
            config = self.store.get_tenant(self.tenant)
            started = time.perf_counter()
            job = TrainingJob(tenant=self.tenant, store_settings=self.store.settings, data_version=data_version,
                              job_id=uuid.uuid4().hex[:8], heartbeat_dir=self.heartbeat_dir)
            with self.runner.run_training_job(job) as result:
                if not result.ok or result.adapter_dir is None:
                    raise ClusterError(f"tenant {self.tenant!r}: training failed: {result.error}")
                body = result.body
                manifest = AdapterManifest(
                    parent_version=None, data_version=data_version, base_model=config.base_model, path="train",
                    checks={"training": body.get("training"), "train_records": body.get("train_records"),
                            "heldout_records": body.get("heldout_records")},
                    arguments={"recipe": body.get("recipe"), "heldout_fraction": config.training.heldout_fraction,
                               "seed": config.training.seed, "runner": self.runner.describe(),
                               "stages": body.get("stages")},
                )
                version = self.store.publish_adapter(self.tenant, result.adapter_dir, manifest)
            head = Head(adapter=version, data=data_version, lease_token=self.lease.check())
            self.store.move_head(self.tenant, head, None)
            logger.info("tenant %s onboarded: adapter %s on data %s (%.1fs)", self.tenant, version, data_version,
                        time.perf_counter() - started)
            self._notify(head, [])
            return version

    def purge_due(self) -> list[dict]:
        """Purge superseded versions whose erasures were published more than the grace period ago."""
        with self._leased():
            head, _ = self.store.get_head(self.tenant)
            if head is None:
                return []
            grace = self.options.purge_grace_seconds
            try:
                entries = self.store.purge(self.tenant, head.adapter, head.data, grace)
                if entries:
                    self.store.record_purge(self.tenant, entries)
            except TenantError as error:  # purge is retried on the next round; never fail a publish for it
                logger.warning("tenant %s: purge failed (retried next round): %s", self.tenant, error)
                return []
            return entries

    def pending_purge_at(self) -> float | None:
        """Seconds from now until the next published erasure's grace period ends, if any is waiting."""
        grace = self._grace_s()
        if grace <= 0:
            return None
        now = time.time()
        waits = [r.published_at.timestamp() + grace - now for r in self.store.list_receipts(self.tenant, "published")
                 if not r.purged and r.published_at is not None and r.published_at.timestamp() + grace > now]
        return max(0.0, min(waits)) if waits else None

    def _grace_s(self) -> float:
        grace = self.options.purge_grace_seconds
        return self.store.settings.purge_grace_seconds if grace is None else grace

    # ============================================================ recovery
    def recover(self) -> list[str]:
        """Finish or re-queue receipts left ``running`` (a coordinator died mid-batch). Returns their ids.

        A request whose adapter version is committed is completed, never re-run: if HEAD already
        points at (a descendant of) that version the receipt is just marked published; if HEAD still
        points at the version's parent, HEAD is moved now (compare-and-swap). Otherwise the request
        goes back to pending and runs again from the current HEAD.

        Runs under the tenant's lease: a receipt left ``running`` was left by a coordinator whose lease
        lapsed or was released (a live one would still hold the lease), so taking it over is safe.
        """
        with self._leased():
            running = self.store.list_receipts(self.tenant, ReceiptStatus.running)
            if not running:
                return []
            versions = self.store.list_adapter_versions(self.tenant)
            manifests = {v: self.store.get_adapter_manifest(self.tenant, v) for v in versions}
            for receipt in running:
                owner = next((v for v in reversed(versions) if receipt.request_id in manifests[v].request_ids), None)
                head, etag = self.store.get_head(self.tenant)
                if owner is not None and head is not None:
                    manifest = manifests[owner]
                    live = self._lineage(head.adapter, manifests)
                    if owner not in live and head.adapter == manifest.parent_version and manifest.data_version:
                        try:
                            self.store.move_head(self.tenant, Head(adapter=owner, data=manifest.data_version,
                                                                   lease_token=self.lease.check()), etag)
                            head = Head(adapter=owner, data=manifest.data_version)
                            live = self._lineage(owner, manifests)
                            logger.info("tenant %s: recovery moved HEAD to %s for %s", self.tenant, owner,
                                        manifest.request_ids)
                            self._notify(head, manifest.request_ids)
                        except (HeadConflictError, ConflictError) as error:
                            logger.warning("tenant %s: recovery could not move HEAD to %s: %s", self.tenant, owner, error)
                    if owner in live:
                        self._update(receipt.request_id, lambda r, m=manifest, o=owner: r.transition(
                            ReceiptStatus.published, new_adapter_version=o, new_data_version=m.data_version,
                            solver=m.solver or r.solver, checks=m.checks or r.checks, path=m.path if m.path != "train" else None,
                            error=None))
                        logger.info("tenant %s: request %s completed by recovery (adapter %s was committed)",
                                    self.tenant, receipt.request_id, owner)
                        continue
                self._update(receipt.request_id, lambda r: r.transition(
                    ReceiptStatus.pending, error="re-queued: its coordinator stopped before publishing"))
                logger.info("tenant %s: request %s re-queued by recovery", self.tenant, receipt.request_id)
            return [r.request_id for r in running]

    @staticmethod
    def _lineage(version: str | None, manifests: dict[str, AdapterManifest]) -> set[str]:
        seen: set[str] = set()
        while version is not None and version in manifests and version not in seen:
            seen.add(version)
            version = manifests[version].parent_version
        return seen

    # ============================================================ one batch
    def _plan(self) -> tuple[Head, str, list[Record], list[_Planned]] | None:
        pending = self.store.list_receipts(self.tenant, ReceiptStatus.pending)
        if not pending:
            return None
        head, etag = self.store.get_head(self.tenant)
        self._check_fence(head)
        if head is None:
            error = f"tenant {self.tenant!r} has no live adapter yet (HEAD not set): onboard it first"
            for receipt in pending:
                self._update(receipt.request_id, lambda r: r.transition(ReceiptStatus.failed, error=error))
            return None
        records = self.store.read_dataset(self.tenant, head.data)
        batch: list[_Planned] = []
        owner: dict[str, tuple[str, str]] = {}  # record id -> (request id, kind) in this batch
        for receipt in pending:
            request = receipt.request
            try:
                selected = request.resolve(records)
            except (TenantError, ValueError) as error:
                self._update(receipt.request_id, lambda r, e=str(error): r.transition(ReceiptStatus.rejected, error=e))
                # The reason may name data subjects: it is in the receipt (redacted after its retention),
                # not in the logs, which no retention policy reaches.
                logger.info("tenant %s: request %s rejected (%s; the reason is in its receipt)", self.tenant,
                            receipt.request_id, type(error).__name__)
                continue
            clashes = [i for i in selected if i in owner]
            if clashes and not (request.kind == "remove" and all(owner[i][1] == "remove" for i in clashes)):
                continue  # edits a record another request of this batch edits: next batch
            edits = [i for i in selected if i not in owner]
            for record_id in edits:
                owner[record_id] = (request.request_id, request.kind)
            batch.append(_Planned(receipt=receipt, selected=selected, edits=edits))
            if len(batch) >= self.options.max_batch:
                break
        if not batch:
            return None
        return head, etag, records, batch

    def _run_batch(self, head: Head, etag: str, records: list[Record], batch: list[_Planned]) -> BatchReport:
        started = time.perf_counter()
        started_at = time.time()
        claimed = []
        for planned in batch:  # pending -> running by compare-and-swap: a request is run by one round only
            queued = max(0.0, started_at - planned.receipt.created_at.timestamp())
            try:
                self._update(planned.receipt.request_id, lambda r, p=planned, q=queued: r.transition(
                    ReceiptStatus.running, old_adapter_version=head.adapter, old_data_version=head.data,
                    records_affected=p.selected, stages={"queued_s": q}, error=None))
            except InvalidTransitionError as error:
                logger.warning("tenant %s: request %s is no longer pending (%s); left out of the batch",
                               self.tenant, planned.receipt.request_id, error)
                continue
            claimed.append(planned)
        batch = claimed
        ids = [p.receipt.request_id for p in batch]
        report = BatchReport(request_ids=ids)
        if not batch:
            report.status = "skipped"
            return report
        logger.info("tenant %s: batch of %d request(s) %s from adapter %s / data %s", self.tenant, len(ids), ids,
                    head.adapter, head.data)
        job = ErasureJob(
            tenant=self.tenant, store_settings=self.store.settings, adapter_version=head.adapter,
            data_version=head.data, requests=tuple(p.receipt.request.model_dump(mode="json") for p in batch),
            selections={p.receipt.request_id: tuple(p.edits) for p in batch}, pipeline=self.options.pipeline,
            job_id=uuid.uuid4().hex[:8], heartbeat_dir=self.heartbeat_dir, curvature=self._warmed(head),
        )
        progress: dict[str, Any] = {}  # "moving": HEAD's write was attempted; "head": HEAD is moved (live)
        stages: dict[str, Any] = {}
        try:
            try:
                result = self.runner.run_erasure_job(job)
            except Exception as error:  # JobFailedError (a timeout included), or anything the runner could not contain
                return self._fail(batch, report, f"erasure job failed: {error}", {"job_s": time.perf_counter() - started},
                                  transient=True)
            with result:
                stages = dict(result.body.get("stages") or {})
                if not result.ok or result.adapter_dir is None:
                    return self._fail(batch, report, result.error or "erasure job gave no adapter", stages,
                                      checks=result.body.get("checks") or {}, solver=result.body.get("solver") or {})
                mark = time.perf_counter()
                self._publish(head, etag, records, batch, result, stages, progress)
                stages["publish_s"] = time.perf_counter() - mark
        except Exception as error:
            if progress.get("moving") and "head" not in progress:
                progress.update(self._head_after_ambiguous_move(progress["moving"]))
            if "unknown" in progress:  # cannot tell whether HEAD moved: never say failed; recovery decides
                logger.error("tenant %s: batch %s: HEAD move outcome unknown (%s); left running for recovery",
                             self.tenant, ids, error)
                report.status, report.error = "unknown", f"publish outcome unknown: {error}"
                return report
            if "head" not in progress:
                if isinstance(error, LeaseLostError):
                    return self._fenced(report, error)
                if isinstance(error, HeadConflictError):
                    return self._requeue_or_fail(batch, report, error)
                return self._fail(batch, report, f"publishing failed: {error}", {"job_s": time.perf_counter() - started},
                                  transient=True)
            # Live already: the receipts must say published, never failed. Complete them now by recovery
            # (it marks 'running' receipts whose adapter version is live); if that fails too, the next
            # round's (or the reconciler's) recovery does.
            logger.warning("tenant %s: batch %s is live as %s but its receipts were not all recorded (%s); "
                           "completing them by recovery", self.tenant, ids, progress["head"].adapter, error)
            report.error = f"published; receipts completed by recovery after: {error}"
            try:
                self.recover()
            except Exception as again:  # noqa: BLE001 (the next recovery completes them)
                logger.warning("tenant %s: recovery of batch %s failed too (retried next round): %s", self.tenant,
                               ids, again)
        new_head = progress["head"]
        self._warmed(new_head)  # drops the superseded version's curvature

        mark = time.perf_counter()
        switched = self._notify(new_head, ids)
        stages["notify_s"] = time.perf_counter() - mark
        stages["total_s"] = time.perf_counter() - started
        for planned in batch:
            try:
                self._update(planned.receipt.request_id, lambda r, s=dict(stages), w=switched: r.update(
                    stages={**r.stages, **s}, **({"replicas_switched_at": w} if w else {})))
            except TenantError as error:  # evidence only: the receipt's status is already right
                logger.warning("tenant %s: could not record the stages of %s: %s", self.tenant,
                               planned.receipt.request_id, error)
        metrics.erasure_batch(self.tenant, "published", len(batch), stages)
        mark = time.perf_counter()
        self.purge_due()
        logger.info("tenant %s: batch %s published as adapter %s / data %s in %.1fs (purge %.1fs)", self.tenant, ids,
                    new_head.adapter, new_head.data, stages["total_s"], time.perf_counter() - mark)
        report.status, report.adapter_version = "published", new_head.adapter
        return report

    def _publish(self, head: Head, etag: str, records: list[Record], batch: list[_Planned], result: JobResult,
                 stages: dict, progress: dict[str, Any]) -> Head:
        """Data version k+1, adapter version k+1, then HEAD (the commit point), then the receipts.

        ``progress`` says how far it got: ``moving`` (the new HEAD) once HEAD's write is attempted, ``head``
        once HEAD is moved: from then on the batch is live, whatever fails after.
        """
        ids = [p.receipt.request_id for p in batch]
        body = result.body
        self.lease.check()  # a coordinator whose lease lapsed during the job writes nothing
        data_version = self._find_data_version(head.data, ids) or self.store.put_dataset(
            self.tenant, self._records_after(records, batch), parent=head.data, request_ids=ids)
        for planned in batch:
            self._update(planned.receipt.request_id, lambda r: r.update(new_data_version=data_version))
        manifest = AdapterManifest(
            parent_version=head.adapter, data_version=data_version, request_ids=ids, solver=body.get("solver"),
            checks=body.get("checks"), path=body.get("path"),
            arguments={"pipeline": self.options.pipeline.to_dict(), "runner": self.runner.describe(), "world_size": body.get("world_size"),
                       "train_records": body.get("train_records"), "heldout_records": body.get("heldout_records"),
                       "trained_records_affected": body.get("trained_records_affected"), "stages": stages},
        )
        adapter_version = self.store.publish_adapter(self.tenant, result.adapter_dir, manifest)
        for planned in batch:
            self._update(planned.receipt.request_id, lambda r: r.update(new_adapter_version=adapter_version))
        new_head = Head(adapter=adapter_version, data=data_version, lease_token=self.lease.check())
        progress["moving"] = new_head
        self.store.move_head(self.tenant, new_head, etag)  # the commit point: from here it is live
        progress["head"] = new_head
        for planned in batch:
            self._update(planned.receipt.request_id, lambda r: r.transition(
                ReceiptStatus.published, new_adapter_version=adapter_version, new_data_version=data_version,
                solver=body.get("solver") or {}, checks=body.get("checks") or {}, path=body.get("path"),
                stages={**r.stages, **stages}, error=None))
        return new_head

    def _head_after_ambiguous_move(self, new_head: Head) -> dict[str, Any]:
        """After HEAD's write raised: {"head": new_head} if HEAD holds it (the write went through), {} if
        not, {"unknown": True} if HEAD cannot be read."""
        try:
            current, _ = self.store.get_head(self.tenant)
        except Exception as error:  # noqa: BLE001
            logger.warning("tenant %s: cannot read HEAD after a failed move: %s", self.tenant, error)
            return {"unknown": True}
        if current is not None and (current.adapter, current.data) == (new_head.adapter, new_head.data):
            return {"head": new_head}
        return {}

    def _find_data_version(self, parent: str, request_ids: list[str]) -> str | None:
        """A data version an interrupted run of this very batch already committed (reused, not duplicated)."""
        for version in reversed(self.store.list_data_versions(self.tenant)):
            manifest = self.store.get_data_manifest(self.tenant, version)
            if manifest.parent == parent and manifest.request_ids == request_ids:
                return version
        return None

    @staticmethod
    def _records_after(records: list[Record], batch: list[_Planned]) -> Iterable[Record]:
        current: Iterable[Record] = records
        for planned in batch:
            current = planned.receipt.request.apply(current, planned.selected)
        return current

    # ============================================================ receipts and hooks
    def _update(self, request_id: str, change: Callable[[Receipt], Any]) -> Receipt:
        """Change a receipt under the lease: the fencing token goes with it, and a receipt a newer holder
        (higher token) already changed is not touched (LeaseLostError)."""
        token = self.lease.token

        def fenced(receipt: Receipt) -> None:
            if token is not None and receipt.lease_token is not None and receipt.lease_token > token:
                raise LeaseLostError(f"tenant {self.tenant!r}: request {request_id!r} is owned by a newer coordinator "
                                     f"(lease token {receipt.lease_token} > {token})")
            change(receipt)
            if token is not None:
                receipt.lease_token = token

        return self.store.update_receipt(self.tenant, request_id, fenced)

    def _check_fence(self, head: Head | None) -> None:
        token = self.lease.token
        if head is not None and token is not None and head.lease_token is not None and head.lease_token > token:
            raise LeaseLostError(f"tenant {self.tenant!r}: HEAD was moved by a newer coordinator "
                                 f"(lease token {head.lease_token} > {token})")

    def _fenced(self, report: BatchReport, error: Exception) -> BatchReport:
        """This coordinator lost its lease mid-batch: it writes nothing more (the new holder owns the work)."""
        logger.error("tenant %s: batch %s abandoned, the lease was lost: %s", self.tenant, report.request_ids, error)
        report.status, report.error = "fenced", str(error)
        return report

    def _fail(self, batch: list[_Planned], report: BatchReport, error: str, stages: dict,
              checks: dict | None = None, solver: dict | None = None, transient: bool = False) -> BatchReport:
        """Receipts ``failed`` with the error, the attempt recorded. ``transient``: a lost or timed-out job,
        S3 unreachable, HEAD contention (the reconciler retries it); else the method refused (final)."""
        logger.warning("tenant %s: batch %s failed%s: %s", self.tenant, report.request_ids,
                       " (transient: retried)" if transient else "", _without_personal_data(error, batch))
        attempt = {"at": datetime.now(timezone.utc).isoformat(), "error": error, "transient": transient}
        for planned in batch:
            self._update(planned.receipt.request_id, lambda r: r.transition(
                ReceiptStatus.failed, error=error, stages={**r.stages, **stages}, attempts=[*r.attempts, attempt],
                **({"checks": checks} if checks else {}), **({"solver": solver} if solver else {})))
        metrics.erasure_batch(self.tenant, "failed", len(batch), stages)
        report.status, report.error = "failed", error
        return report

    def _requeue_or_fail(self, batch: list[_Planned], report: BatchReport, error: Exception) -> BatchReport:
        conflicts = sum(1 for b in self.batches if b.status == "requeued" and b.request_ids == report.request_ids)
        if conflicts + 1 >= self.options.max_head_conflicts:
            return self._fail(batch, report, f"HEAD kept moving under the coordinator: {error}", {}, transient=True)
        for planned in batch:
            self._update(planned.receipt.request_id, lambda r: r.transition(
                ReceiptStatus.pending, error=f"re-queued: HEAD moved during the run ({error})"))
        report.status, report.error = "requeued", str(error)
        return report

    def hooks(self) -> list[PublishHook]:
        hooks = self._hooks() if callable(self._hooks) else self._hooks
        return list(hooks or ())

    def _notify(self, head: Head, request_ids: list[str]) -> datetime | None:
        """Call every publish hook; returns when every replica switched, if the hooks say so."""
        switched: list[Any] = []
        hooks = self.hooks()
        for hook in hooks:
            try:
                answer = hook(self.tenant, head)
            except Exception as error:  # serving also polls HEAD: a failed notification only delays it
                logger.warning("tenant %s: publish hook %r failed for adapter %s: %s", self.tenant, hook, head.adapter,
                               error)
                continue
            if isinstance(answer, dict) and answer.get("switched_at"):
                switched.append(answer["switched_at"])
        if not hooks or len(switched) < len(hooks):
            return None
        stamps = [s if isinstance(s, datetime) else datetime.fromisoformat(str(s)) for s in switched]
        return max(stamps)
