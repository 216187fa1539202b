"""`eraser tenants train|erase`: a tenant's onboarding and its erasures run through the tenant's coordinator
(the cluster layer), as a job on a Ray cluster (``--address`` / ``$RAY_ADDRESS``) or in this process.

Registered under ``eraser tenants`` by :mod:`cli.tenants_cmd`; the store is opened as there
(:mod:`cli.store_args`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cli.store_args import open_cli_store, tenant_action


def register_cluster_commands(actions: Any, common: list[argparse.ArgumentParser]) -> None:
    """`eraser tenants train|erase`: run through the tenant's coordinator, on a Ray cluster or here."""
    where = argparse.ArgumentParser(add_help=False)
    target = where.add_mutually_exclusive_group()
    target.add_argument("--address", help="Ray cluster to submit to (default: $RAY_ADDRESS; neither: run locally)")
    target.add_argument("--local", action="store_true", help="run the job in this process (no Ray)")
    where.add_argument("--workers", type=int, help="workers per job (default ERASER_CLUSTER_WORKERS or 1): more than 1 runs a Ray "
                       "Train job, 1 a pooled Ray task (ERASER_CLUSTER_RUNNER=ray-train forces Train)")
    where.add_argument("--gpu", action="store_true", help="one GPU per Ray Train worker (NCCL)")
    where.add_argument("--namespace", help="Ray namespace of the coordinators (default eraser)")

    train = tenant_action(
        actions, "train", run_train, [*common, where], help="train a tenant's first adapter (onboarding)",
        description="Train the tenant's first LoRA adapter on the non-held-out split of a data version "
        "(a Ray Train job, or in this process), publish it as the first adapter version and point HEAD at it.")
    train.add_argument("--data-version", help="data version to train on (default: the newest)")

    erase = tenant_action(
        actions, "erase", run_erase, [*common, where], help="erase or correct records: request(s) through the coordinator",
        description="Record erasure requests (a JSON object, a list, or JSON Lines; 'tenant' defaults to NAME) "
        "and run them through the tenant's coordinator: one solve, verify and guard, publish the new adapter and "
        "data versions, move HEAD, purge. Prints the receipts; exit 1 if any failed.")
    erase.add_argument("--request", required=True, type=Path, help="request file (.json or .jsonl)")
    erase.add_argument("--no-wait", action="store_true", help="record and schedule only (Ray); do not wait")
    erase.add_argument("--purge-grace", type=float, help="seconds superseded versions are kept (default: the store's)")
    erase.add_argument("--no-wait-purge", action="store_true", help="do not wait out the grace period to purge")


def _erasure_service(args: argparse.Namespace, store: Any) -> Any:
    import os

    from cluster import CoordinatorOptions, LocalErasureService, RayErasureService, RunnerSpec

    options = CoordinatorOptions(purge_grace_seconds=getattr(args, "purge_grace", None))
    use_ray = not args.local and bool(args.address or os.environ.get("RAY_ADDRESS"))
    spec: dict[str, Any] = {"use_gpu": args.gpu} | ({} if use_ray else {"kind": "local"})  # ray: ERASER_CLUSTER_RUNNER
    if args.workers is not None:
        spec["num_workers"] = args.workers
    if not use_ray:
        return LocalErasureService(store.settings, RunnerSpec(**spec), options)
    extra = {"namespace": args.namespace} if args.namespace else {}
    return RayErasureService(store.settings, RunnerSpec(**spec), options, address=args.address, **extra)


def run_train(args: argparse.Namespace) -> int:
    from cli.main import CommandError
    from cluster.errors import ClusterError

    with open_cli_store(args) as store:
        try:
            version = _erasure_service(args, store).onboard(args.name, args.data_version)
        except ClusterError as error:
            raise CommandError(str(error)) from None
        head, _ = store.get_head(args.name)
        manifest = store.get_adapter_manifest(args.name, version)
        training = (manifest.checks or {}).get("training") or {}
        print(f"tenant {args.name}: adapter {version} trained on data {head.data} "
              f"({(manifest.checks or {}).get('train_records')} records, final loss {training.get('final_loss', float('nan')):.4f}); "
              f"HEAD -> {head.adapter}")
    return 0


def run_erase(args: argparse.Namespace) -> int:
    from cli.main import CommandError
    from cluster.batch import exit_status, parse_requests, run_batch, summary_table
    from cluster.errors import ClusterError

    if not args.request.is_file():
        raise FileNotFoundError(f"request file not found: {args.request}")
    text = args.request.read_text(encoding="utf-8")
    try:
        body = json.loads(text)
        items = body if isinstance(body, list) else [body]
        text = "\n".join(json.dumps({"tenant": args.name, **item} if isinstance(item, dict) else item) for item in items)
    except json.JSONDecodeError:
        pass  # JSON Lines: each line must name its tenant
    entries = parse_requests(text, str(args.request))
    strangers = sorted({e.request.tenant for e in entries if e.request is not None and e.request.tenant != args.name})
    if strangers:
        raise CommandError(f"{args.request}: requests for other tenants {strangers}; "
                           "use python -m cluster.batch for many tenants")
    with open_cli_store(args) as store:
        try:
            service = _erasure_service(args, store)
            if args.no_wait:
                for entry in entries:
                    if entry.request is not None:
                        receipt = service.submit(entry.request)
                        print(f"{receipt.request_id}: {receipt.status.value}")
                return 0
            run_batch(service, entries, sys.stdout, wait_purge=not args.no_wait_purge)
        except ClusterError as error:
            raise CommandError(str(error)) from None
        print()
        print(summary_table(entries))
    return exit_status(entries)
