"""`eraser tenants ...`: manage tenants in the store (create, import, list, show, upload, keys, receipts, purge).

The store is the configured S3 (``ERASER_S3_ENDPOINT``, ``ERASER_S3_BUCKET``, ``ERASER_S3_PREFIX``,
credentials the usual AWS way) or, when no endpoint is set, an embedded SeaweedFS whose data lives
in ``--data-dir`` / ``$ERASER_HOME`` (default ``./.eraser``), started for the command's duration.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

STORE_HELP = (
    "Uses ERASER_S3_ENDPOINT/ERASER_S3_BUCKET/ERASER_S3_PREFIX when set; otherwise starts an embedded "
    "SeaweedFS with its data in --data-dir (default $ERASER_HOME or ./.eraser)."
)


def register(subparsers: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data-dir", type=Path, default=None,
        help="embedded store directory when no ERASER_S3_ENDPOINT is set (default: $ERASER_HOME or ./.eraser)",
    )
    group = subparsers.add_parser("tenants", help="manage tenants: records, keys, receipts, purge",
                                  description="Manage tenants in the S3 store. " + STORE_HELP)
    actions = group.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    create = actions.add_parser("create", parents=[common], help="create a tenant",
                                description="Create a tenant (tenant.json) with its base model and recipes.")
    create.add_argument("name", help="tenant name: lowercase letters, digits and '-'")
    create.add_argument("--base-model", required=True, help="model name under models/, an s3:// URI or a local path")
    create.add_argument("--config", type=Path, help="JSON file with 'lora' and/or 'training' sections")
    create.add_argument("--lora-rank", type=int, help="LoRA rank (default 8)")
    create.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 16)")
    create.add_argument("--epochs", type=int, help="training epochs (default 3)")
    create.add_argument("--lr", type=float, help="learning rate (default 2e-4)")
    create.add_argument("--batch-size", type=int, help="training batch size (default 8)")
    create.add_argument("--seed", type=int, help="training seed (default 0)")
    create.add_argument("--heldout-fraction", type=float, help="share of records held out (default 0.1)")
    create.add_argument("--issue-key", action="store_true", help="also issue an API key and print it (once)")
    create.set_defaults(handler=run_create)

    imported = actions.add_parser(
        "import", parents=[common], help="create a tenant from an adapter trained elsewhere",
        description="Create a tenant from an existing PEFT LoRA adapter, as if the service had trained it: "
        "adapter version 1 (the adapter, checked against its base model first), data version 1 (the records it "
        "was trained on, then the reference records flagged 'heldout') and HEAD on them. The LoRA shape is read "
        "from the adapter's adapter_config.json. Nothing is written when anything is refused.")
    imported.add_argument("name", help="tenant name: lowercase letters, digits and '-'")
    imported.add_argument("--base-model", required=True, help="model name under models/, an s3:// URI or a local path")
    imported.add_argument("--adapter", required=True, type=Path, help="PEFT adapter directory (adapter_config.json, "
                          "adapter_model.safetensors)")
    imported.add_argument("--data", required=True, type=Path, help="the records the adapter was trained on (.jsonl)")
    imported.add_argument("--reference", required=True, type=Path, help="records of the same kind the adapter never "
                          "trained on (.jsonl): the membership test's reference population")
    imported.add_argument("--recipe", type=Path, help="JSON file with the training recipe (epochs, lr, batch_size, "
                          "seed, max_length, chat_template); with epochs, lr and batch_size it enables the exact-retrain "
                          "fallback, without it there is none")
    imported.add_argument("--issue-key", action="store_true", help="also issue an API key and print it (once)")
    imported.set_defaults(handler=run_import)

    listing = actions.add_parser("list", parents=[common], help="list tenant names")
    listing.set_defaults(handler=run_list)

    show = actions.add_parser("show", parents=[common], help="show a tenant: config, HEAD, versions (JSON)")
    show.add_argument("name")
    show.set_defaults(handler=run_show)

    upload = actions.add_parser("upload", parents=[common], help="upload records as a new data version",
                                description="Validate a JSON Lines file of records ({id, subject?, prompt, "
                                "response} per line) and store it as a new immutable data version.")
    upload.add_argument("name")
    upload.add_argument("records", type=Path, help="records file (.jsonl or .jsonl.gz)")
    upload.add_argument("--parent", help="data version this one derives from")
    upload.set_defaults(handler=run_upload)

    keys = actions.add_parser("keys", help="API keys: issue, list, revoke, admin")
    key_actions = keys.add_subparsers(dest="key_action", metavar="KEY_ACTION")
    key_actions.required = True
    issue = key_actions.add_parser("issue", parents=[common], help="issue a tenant API key (printed once)")
    issue.add_argument("name")
    issue.add_argument("--label", help="note stored with the key")
    issue.set_defaults(handler=run_keys_issue)
    key_list = key_actions.add_parser("list", parents=[common], help="list a tenant's key ids")
    key_list.add_argument("name")
    key_list.set_defaults(handler=run_keys_list)
    revoke = key_actions.add_parser("revoke", parents=[common], help="revoke a tenant key by id")
    revoke.add_argument("name")
    revoke.add_argument("key_id")
    revoke.set_defaults(handler=run_keys_revoke)
    admin = key_actions.add_parser("admin", parents=[common], help="create the admin key if none exists (printed once)")
    admin.add_argument("--rotate", action="store_true", help="replace the stored admin key")
    admin.set_defaults(handler=run_keys_admin)

    receipts = actions.add_parser("receipts", parents=[common], help="show erasure receipts (JSON)")
    receipts.add_argument("name")
    receipts.add_argument("--status", choices=["pending", "running", "published", "failed", "rejected"])
    receipts.add_argument("--id", dest="request_id", help="one request id")
    receipts.set_defaults(handler=run_receipts)

    purge = actions.add_parser("purge", parents=[common], help="delete superseded versions holding erased records",
                               description="Delete adapter and data versions that are not HEAD's and still hold "
                               "records of erasures published more than --grace seconds ago; log it in the receipts.")
    purge.add_argument("name")
    purge.add_argument("--grace", type=float, help="seconds after publication (default ERASER_S3_PURGE_GRACE_SECONDS or 60)")
    purge.add_argument("--dry-run", action="store_true", help="report what would be deleted")
    purge.set_defaults(handler=run_purge)

    register_cluster_commands(actions, common)


def _store(args: argparse.Namespace) -> Any:
    from tenants.embedded import open_store

    return open_store(data_dir=args.data_dir)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _one_line(error: Any) -> str:
    """A pydantic ValidationError as one line: 'field: message; field: message'."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item.get("loc", ())) or "input"
        parts.append(f"{where}: {item.get('msg')}")
    return "; ".join(parts)


def run_create(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from tenants.errors import InvalidConfigError
    from tenants.models import TenantConfig
    from tenants.paths import validate_tenant_name

    validate_tenant_name(args.name)

    fields: dict[str, Any] = {"name": args.name, "base_model": args.base_model}
    if args.config is not None:
        if not args.config.is_file():
            raise FileNotFoundError(f"config file not found: {args.config}")
        extra = json.loads(args.config.read_text())
        fields.update({k: v for k, v in extra.items() if k in ("lora", "training")})
    lora = dict(fields.get("lora") or {})
    training = dict(fields.get("training") or {})
    for flag, section, key in (("lora_rank", lora, "rank"), ("lora_alpha", lora, "alpha"), ("epochs", training, "epochs"),
                               ("lr", training, "lr"), ("batch_size", training, "batch_size"), ("seed", training, "seed"),
                               ("heldout_fraction", training, "heldout_fraction")):
        if getattr(args, flag) is not None:
            section[key] = getattr(args, flag)
    fields["lora"], fields["training"] = lora, training
    try:
        config = TenantConfig.model_validate(fields)
    except ValidationError as error:
        raise InvalidConfigError(f"invalid tenant configuration: {_one_line(error)}") from None
    with _store(args) as store:
        store.create_tenant(config)
        print(f"tenant {config.name} created (base model {config.base_model})")
        if args.issue_key:
            print(f"API key (shown once): {store.issue_key(config.name, label='created with tenant')}")
    return 0


def _json_file(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; the error names the file and what it was for."""
    from cli.main import CommandError

    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CommandError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(body, dict):
        raise CommandError(f"{path}: expected a JSON object, got {type(body).__name__}")
    return body


def run_import(args: argparse.Namespace) -> int:
    from cluster.service import LocalErasureService
    from tenants.paths import validate_tenant_name
    from tenants.records import read_jsonl
    from tenants.store import imported_config

    validate_tenant_name(args.name)
    for path, what in ((args.data, "records file"), (args.reference, "reference file")):
        if not path.is_file():
            raise FileNotFoundError(f"{what} not found: {path}")
    peft_config = _json_file(args.adapter / "adapter_config.json", "adapter config")
    recipe = _json_file(args.recipe, "recipe file") if args.recipe is not None else None
    config = imported_config(args.name, args.base_model, peft_config, recipe)
    records, reference = list(read_jsonl(args.data)), list(read_jsonl(args.reference))
    with _store(args) as store:
        head = LocalErasureService(store.settings).import_tenant(config, args.adapter, records, reference,
                                                                 via=f"eraser tenants import ({args.adapter})")
        print(f"tenant {config.name} imported (base model {config.base_model}, LoRA rank {config.lora.rank}): "
              f"adapter {head.adapter}, data {head.data} ({len(records)} training + {len(reference)} reference "
              f"records); HEAD -> {head.adapter}")
        unavailable = config.retrain_unavailable()
        if unavailable:
            print(f"exact-retrain fallback {unavailable}: an erasure that neither the influence update nor "
                  "remediation makes pass the membership test fails instead of retraining")
        if args.issue_key:
            print(f"API key (shown once): {store.issue_key(config.name, label='created with import')}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        for name in store.list_tenants():
            print(name)
    return 0


def run_show(args: argparse.Namespace) -> int:
    with _store(args) as store:
        config = store.get_tenant(args.name)
        head, _ = store.get_head(args.name)
        receipts = store.list_receipts(args.name)
        counts: dict[str, int] = {}
        for receipt in receipts:
            counts[receipt.status.value] = counts.get(receipt.status.value, 0) + 1
        _print_json({
            **config.public(),
            "head": head.model_dump(mode="json") if head else None,
            "adapter_versions": store.list_adapter_versions(args.name),
            "data_versions": store.list_data_versions(args.name),
            "receipts": counts,
        })
    return 0


def run_upload(args: argparse.Namespace) -> int:
    from tenants.records import read_jsonl

    if not args.records.is_file():
        raise FileNotFoundError(f"records file not found: {args.records}")
    with _store(args) as store:
        version = store.put_dataset(args.name, read_jsonl(args.records), parent=args.parent)
        manifest = store.get_data_manifest(args.name, version)
        print(f"tenant {args.name}: data version {version} ({manifest.records} records, {len(manifest.shards)} shards)")
    return 0


def run_keys_issue(args: argparse.Namespace) -> int:
    with _store(args) as store:
        api_key = store.issue_key(args.name, label=args.label)
    print(api_key)
    print("store this key now: it is shown once and kept only as a hash", file=sys.stderr)
    return 0


def run_keys_list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        for key in store.list_keys(args.name):
            print(f"{key.key_id}  {key.created_at.isoformat()}  {key.label or ''}".rstrip())
    return 0


def run_keys_revoke(args: argparse.Namespace) -> int:
    from tenants.errors import AuthError

    with _store(args) as store:
        if not store.revoke_key(args.name, args.key_id):
            raise AuthError(f"tenant {args.name!r} has no key {args.key_id!r}")
    print(f"tenant {args.name}: key {args.key_id} revoked")
    return 0


def run_keys_admin(args: argparse.Namespace) -> int:
    with _store(args) as store:
        api_key = store.rotate_admin_key() if args.rotate else store.ensure_admin_key()
    if api_key is None:
        print("an admin key already exists (or ERASER_ADMIN_KEY is set); use --rotate to replace it", file=sys.stderr)
        return 0
    print(api_key)
    print("store this key now: it is shown once and kept only as a hash", file=sys.stderr)
    return 0


def run_receipts(args: argparse.Namespace) -> int:
    with _store(args) as store:
        if args.request_id:
            _print_json(store.get_receipt(args.name, args.request_id).model_dump(mode="json"))
        else:
            _print_json([r.model_dump(mode="json") for r in store.list_receipts(args.name, args.status)])
    return 0


def run_purge(args: argparse.Namespace) -> int:
    from tenants.errors import VersionNotFoundError

    with _store(args) as store:
        head, _ = store.get_head(args.name)
        if head is None:
            store.get_tenant(args.name)  # TenantNotFoundError first if that is the problem
            raise VersionNotFoundError(f"tenant {args.name!r} has no HEAD yet: nothing is superseded")
        entries = store.purge(args.name, head.adapter, head.data, args.grace, dry_run=args.dry_run)
        if entries and not args.dry_run:
            store.record_purge(args.name, entries)
    verb = "would delete" if args.dry_run else "deleted"
    for entry in entries:
        print(f"{verb} {entry['kind']} {entry['version']} ({entry['objects']} objects) for {', '.join(entry['request_ids']) or 'abandoned upload'}")
    if not entries:
        print("nothing to purge")
    return 0


# ---------------------------------------------------------------- train / erase (the cluster layer)


def register_cluster_commands(actions: Any, common: argparse.ArgumentParser) -> None:
    """`eraser tenants train|erase`: run through the tenant's coordinator, on a Ray cluster or here."""
    where = argparse.ArgumentParser(add_help=False)
    target = where.add_mutually_exclusive_group()
    target.add_argument("--address", help="Ray cluster to submit to (default: $RAY_ADDRESS; neither: run locally)")
    target.add_argument("--local", action="store_true", help="run the job in this process (no Ray)")
    where.add_argument("--workers", type=int, help="workers per job (default ERASER_CLUSTER_WORKERS or 1): more than 1 runs a Ray "
                       "Train job, 1 a pooled Ray task (ERASER_CLUSTER_RUNNER=ray-train forces Train)")
    where.add_argument("--gpu", action="store_true", help="one GPU per Ray Train worker (NCCL)")
    where.add_argument("--namespace", help="Ray namespace of the coordinators (default eraser)")

    train = actions.add_parser(
        "train", parents=[common, where], help="train a tenant's first adapter (onboarding)",
        description="Train the tenant's first LoRA adapter on the non-held-out split of a data version "
        "(a Ray Train job, or in this process), publish it as the first adapter version and point HEAD at it.")
    train.add_argument("name")
    train.add_argument("--data-version", help="data version to train on (default: the newest)")
    train.set_defaults(handler=run_train)

    erase = actions.add_parser(
        "erase", parents=[common, where], help="erase or correct records: request(s) through the coordinator",
        description="Record erasure requests (a JSON object, a list, or JSON Lines; 'tenant' defaults to NAME) "
        "and run them through the tenant's coordinator: one solve, verify and guard, publish the new adapter and "
        "data versions, move HEAD, purge. Prints the receipts; exit 1 if any failed.")
    erase.add_argument("name")
    erase.add_argument("--request", required=True, type=Path, help="request file (.json or .jsonl)")
    erase.add_argument("--no-wait", action="store_true", help="record and schedule only (Ray); do not wait")
    erase.add_argument("--purge-grace", type=float, help="seconds superseded versions are kept (default: the store's)")
    erase.add_argument("--no-wait-purge", action="store_true", help="do not wait out the grace period to purge")
    erase.set_defaults(handler=run_erase)


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

    with _store(args) as store:
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
    with _store(args) as store:
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

