"""Batch erasure: ``python -m cluster.batch --requests FILE|s3://BUCKET/KEY`` (for ``ray job submit``).

Reads erasure requests (a JSON list, one JSON object, or JSON Lines) for any number of tenants,
records each in its tenant's ledger and runs them through the tenants' coordinators, the same code
path as the HTTP service: tenants in parallel, each tenant's requests batched into one solve.
Prints progress while it runs and a summary table at the end. Exit status: 0 when every request
was published (or rejected as invalid, unless ``--strict``), 1 when any failed or could not be
recorded, 2 on a usage error.

    ray job submit --address http://HEAD:8265 -- python -m cluster.batch --requests s3://eraser/batches/b1.jsonl

The store is the one ``ERASER_S3_*`` configures (an embedded SeaweedFS when no endpoint is set and
``--local``). With ``--local`` no Ray is used: jobs run in this process.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TextIO

from pydantic import ValidationError

from eraser.influence import SolveConfig
from eraser.pipeline import PipelineConfig
from eraser.solvers import SOLVERS
from tenants.errors import TenantError
from tenants.models import ErasureRequest, Receipt
from tenants.settings import StoreSettings

from cluster.config import NAMESPACE, CoordinatorOptions, RunnerSpec
from cluster.errors import ClusterError
from cluster.service import ErasureService, LocalErasureService, RayErasureService

logger = logging.getLogger(__name__)


@dataclass
class Entry:
    """One line of the input: a request, or why it could not be recorded."""

    source: str  # "file:line" for messages
    tenant: str | None = None
    request_id: str | None = None
    kind: str | None = None
    request: ErasureRequest | None = None
    error: str | None = None  # could not be parsed or recorded
    receipt: Receipt | None = None


# ---------------------------------------------------------------- input


def read_text(uri: str, settings: StoreSettings) -> str:
    """The requests file's text, from a local path or ``s3://bucket/key`` (with the store's credentials)."""
    if uri.startswith("s3://"):
        from tenants.s3io import make_client

        bucket, _, key = uri[len("s3://"):].partition("/")
        if not bucket or not key:
            raise ClusterError(f"--requests {uri!r}: expected s3://BUCKET/KEY")
        body = make_client(settings).get_object(Bucket=bucket, Key=key)["Body"].read()
        return body.decode("utf-8")
    path = Path(uri)
    if not path.is_file():
        raise FileNotFoundError(f"requests file not found: {path}")
    return path.read_text(encoding="utf-8")


def parse_requests(text: str, source: str) -> list[Entry]:
    """A JSON list, a single JSON object, or JSON Lines; every item becomes an Entry (errors kept)."""
    items: list[tuple[str, Any]] = []
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None  # not one JSON document: JSON Lines
    if isinstance(whole, list):
        items = [(f"{source}[{i}]", obj) for i, obj in enumerate(whole)]
    elif isinstance(whole, dict):
        items = [(source, whole)]
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append((f"{source}:{number}", json.loads(line)))
            except json.JSONDecodeError as error:
                items.append((f"{source}:{number}", ValueError(f"invalid JSON: {error.msg}")))
    entries = []
    for where, obj in items:
        entry = Entry(source=where)
        if isinstance(obj, dict):
            entry.tenant, entry.request_id, entry.kind = obj.get("tenant"), obj.get("request_id"), obj.get("kind")
        if isinstance(obj, Exception):
            entry.error = str(obj)
        else:
            try:
                entry.request = ErasureRequest.model_validate(obj)
            except ValidationError as error:
                first = error.errors()[0]
                entry.error = f"invalid request: {'.'.join(map(str, first.get('loc', ()))) or 'request'}: {first.get('msg')}"
        entries.append(entry)
    return entries


# ---------------------------------------------------------------- run


def run_batch(service: ErasureService, entries: list[Entry], out: TextIO, poll_s: float = 2.0,
              wait_purge: bool = True, timeout_s: float | None = None) -> list[Entry]:
    """Record every request, run each tenant's coordinator until idle, report progress; fills receipts."""
    started = time.monotonic()
    tenants: list[str] = []
    for entry in entries:
        if entry.request is None:
            continue
        try:
            entry.receipt = service.submit(entry.request, start=False)  # all recorded first: one solve per tenant
        except (TenantError, ClusterError) as error:
            entry.error = str(error)
            continue
        if entry.request.tenant not in tenants:
            tenants.append(entry.request.tenant)
    recorded = [e for e in entries if e.receipt is not None]
    out.write(f"batch: {len(entries)} request(s), {len(recorded)} recorded, {len(tenants)} tenant(s): "
              f"{', '.join(tenants) or '-'}\n")
    out.flush()

    if isinstance(service, RayErasureService):
        import ray

        refs = service.process_async(tenants)
        waiting = dict(refs)
        last = ""
        while waiting:
            done, _ = ray.wait(list(waiting.values()), num_returns=len(waiting), timeout=poll_s)
            for tenant, ref in list(waiting.items()):
                if ref in done:
                    ray.get(ref)  # raises what the coordinator could not contain
                    del waiting[tenant]
            last = _progress(service, recorded, started, out, last)
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                raise ClusterError(f"batch not finished after {timeout_s:.0f}s (tenants still running: {sorted(waiting)})")
    else:
        service.process(tenants)
    _progress(service, recorded, started, out, "")

    if wait_purge:
        _wait_purge(service, recorded, tenants, out)
    for entry in recorded:
        entry.receipt = service.store.get_receipt(entry.request.tenant, entry.request.request_id)
    return entries


def _progress(service: ErasureService, recorded: list[Entry], started: float, out: TextIO, last: str) -> str:
    counts: dict[str, dict[str, int]] = {}
    for entry in recorded:
        status = service.store.get_receipt(entry.request.tenant, entry.request.request_id).status.value
        counts.setdefault(entry.request.tenant, {}).setdefault(status, 0)
        counts[entry.request.tenant][status] += 1
    line = "; ".join(f"{t}: " + ", ".join(f"{n} {s}" for s, n in sorted(c.items())) for t, c in counts.items())
    if line != last:
        out.write(f"[{time.monotonic() - started:6.1f}s] {line}\n")
        out.flush()
    return line


def _wait_purge(service: ErasureService, recorded: list[Entry], tenants: list[str], out: TextIO) -> None:
    """Wait out the grace period of what this batch published, then purge (an erasure is complete
    only when superseded versions holding the records are gone)."""
    grace = service.options.purge_grace_seconds
    grace = service.store.settings.purge_grace_seconds if grace is None else grace
    published = [service.store.get_receipt(e.request.tenant, e.request.request_id) for e in recorded]
    published = [r for r in published if r.status.value == "published" and not r.purged and r.published_at]
    if not published:
        return
    wait = max(r.published_at.timestamp() for r in published) + grace - time.time()
    if wait > 0:
        out.write(f"waiting {wait:.0f}s for the purge grace period ({grace:g}s) before purging superseded versions\n")
        out.flush()
        time.sleep(wait + 0.5)
    service.purge_due(sorted({r.tenant for r in published}))


# ---------------------------------------------------------------- report


def summary_table(entries: Sequence[Entry]) -> str:
    """One row per request: tenant, id, kind, status, adapter old -> new, records, path, seconds, note."""
    header = ("TENANT", "REQUEST", "KIND", "STATUS", "ADAPTER", "RECORDS", "PATH", "SECONDS", "NOTE")
    rows = [header]
    for entry in entries:
        receipt = entry.receipt
        if receipt is None:
            rows.append((entry.tenant or "?", entry.request_id or "?", entry.kind or "?", "invalid", "-", "-", "-", "-",
                         f"{entry.source}: {entry.error}"))
            continue
        adapter = f"{receipt.old_adapter_version or '-'} -> {receipt.new_adapter_version or '-'}"
        seconds = receipt.stages.get("total_s")
        note = receipt.error or (f"purged {len(receipt.purged)} version(s)" if receipt.purged else "")
        if receipt.status.value == "published" and not receipt.purged:
            note = "purge pending (grace period)"
        if receipt.status.value == "published":  # published is live; complete is checked (receipt.completion)
            note += "; complete" if receipt.completed_at else "; not yet complete"
        rows.append((receipt.tenant, receipt.request_id, receipt.request.kind, receipt.status.value, adapter,
                     str(len(receipt.records_affected)), receipt.path or "-",
                     f"{seconds:.1f}" if seconds is not None else "-", note))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row[:-1], widths)) + "  " + str(row[-1])
             for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def exit_status(entries: Sequence[Entry], strict: bool = False) -> int:
    statuses = [e.receipt.status.value if e.receipt else "invalid" for e in entries]
    if any(s in ("failed", "invalid", "pending", "running") for s in statuses):
        return 1
    if strict and any(s == "rejected" for s in statuses):
        return 1
    return 0


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cluster.batch", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", required=True, help="requests file: local path or s3://BUCKET/KEY (JSON list or JSON Lines)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--address", help="Ray cluster to use (default: RAY_ADDRESS, as set by `ray job submit`)")
    where.add_argument("--local", action="store_true", help="no Ray: run every job in this process")
    parser.add_argument("--workers", type=int, default=None, help="workers per erasure (default ERASER_CLUSTER_WORKERS or 1): more than 1 runs a Ray Train job, "
                        "1 a pooled Ray task (ERASER_CLUSTER_RUNNER=ray-train forces Train)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per Train worker (NCCL)")
    parser.add_argument("--max-failures", type=int, default=None, help="Train retries after a worker dies (default 1)")
    parser.add_argument("--namespace", default=NAMESPACE, help=f"Ray namespace of the coordinators (default {NAMESPACE})")
    parser.add_argument("--purge-grace", type=float, default=None,
                        help="seconds superseded versions are kept after a publish (default ERASER_S3_PURGE_GRACE_SECONDS)")
    parser.add_argument("--no-wait-purge", action="store_true", help="do not wait out the grace period to purge")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any request is rejected too")
    parser.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    defaults = PipelineConfig().solve
    parser.add_argument("--solver", choices=SOLVERS, default=defaults.solver)
    parser.add_argument("--curvature", choices=("ggn", "hessian"), default=defaults.curvature)
    parser.add_argument("--damping", type=float, default=defaults.damping,
                        help="relative to the top eigenvalue; used where the per-request search does not run")
    parser.add_argument("--no-damping-search", action="store_true", help="use --damping as given")
    parser.add_argument("--tol", type=float, default=None)
    parser.add_argument("--max-iters", type=int, default=None,
                        help=f"solver iterations (default {defaults.max_iters} for eigen: the bare low-rank solution; "
                        f"{SolveConfig().max_iters} for the others)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--no-remediate", action="store_true", help="no remediation fine-tune after a failed membership test")
    parser.add_argument("--no-retrain", action="store_true", help="no exact-retrain fallback (fail instead)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def options_from_args(args: argparse.Namespace) -> tuple[RunnerSpec, CoordinatorOptions]:
    runner_fields: dict[str, Any] = {"use_gpu": args.gpu} | ({"kind": "local"} if args.local else {})
    if args.workers is not None:
        runner_fields["num_workers"] = args.workers
    if args.max_failures is not None:
        runner_fields["max_failures"] = args.max_failures
    max_iters = args.max_iters if args.max_iters is not None else (
        PipelineConfig().solve.max_iters if args.solver == "eigen" else SolveConfig().max_iters)
    solve = SolveConfig(solver=args.solver, curvature=args.curvature, damping=args.damping, tol=args.tol,
                        max_iters=max_iters, seed=args.seed)
    pipeline = PipelineConfig(solve=solve, remediate=not args.no_remediate, retrain=not args.no_retrain,
                              **({"search": None} if args.no_damping_search else {}))
    options = CoordinatorOptions(pipeline=pipeline, purge_grace_seconds=args.purge_grace)
    return RunnerSpec(**runner_fields), options


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        runner, options = options_from_args(args)
        if args.local:
            from tenants.embedded import open_store

            with open_store() as store:
                service = LocalErasureService(store.settings, runner, options)
                return _run(service, args, out)
        service = RayErasureService(StoreSettings(), runner, options, namespace=args.namespace, address=args.address)
        return _run(service, args, out)
    except (ClusterError, TenantError, FileNotFoundError) as error:
        print(f"cluster.batch: error: {error}", file=sys.stderr)
        return 2


def _run(service: ErasureService, args: argparse.Namespace, out: TextIO) -> int:
    text = read_text(args.requests, service.store_settings)
    entries = parse_requests(text, args.requests)
    if not entries:
        raise ClusterError(f"--requests {args.requests}: no requests in it")
    run_batch(service, entries, out, wait_purge=not args.no_wait_purge, timeout_s=args.timeout)
    out.write("\n" + summary_table(entries) + "\n")
    statuses = [e.receipt.status.value if e.receipt else "invalid" for e in entries]
    counts = {s: statuses.count(s) for s in ("published", "rejected", "failed", "invalid") if statuses.count(s)}
    out.write("\n" + ", ".join(f"{n} {s}" for s, n in counts.items()) + "\n")
    out.flush()
    return exit_status(entries, args.strict)


if __name__ == "__main__":
    sys.exit(main())
