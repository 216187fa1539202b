"""`eraser tenants ...`: manage tenants in the store (create, import, list, show, upload, keys, receipts, purge).

Where the store is and how a command opens it: :mod:`cli.store_args`. ``eraser tenants train|erase``,
which run through the tenant's coordinator (the cluster layer), live in :mod:`cli.tenants_jobs_cmd`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cli.store_args import STORE_HELP, open_cli_store, store_parent, tenant_action


def register(subparsers: Any) -> None:
    from cli.tenants_jobs_cmd import register_cluster_commands

    common = [store_parent()]
    group = subparsers.add_parser("tenants", help="manage tenants: records, keys, receipts, purge",
                                  description="Manage tenants in the S3 store. " + STORE_HELP)
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)

    create = tenant_action(actions, "create", run_create, common, help="create a tenant",
                           description="Create a tenant (tenant.json) with its base model and recipes.")
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

    imported = tenant_action(
        actions, "import", run_import, common, help="create a tenant from an adapter trained elsewhere",
        description="Create a tenant from an existing PEFT LoRA adapter, as if the service had trained it: "
        "adapter version 1 (the adapter, checked against its base model first), data version 1 (the records it "
        "was trained on, then the reference records flagged 'heldout') and HEAD on them. The LoRA shape is read "
        "from the adapter's adapter_config.json. Nothing is written when anything is refused.")
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

    tenant_action(actions, "list", run_list, common, name=False, help="list tenant names")
    tenant_action(actions, "show", run_show, common, help="show a tenant: config, HEAD, versions (JSON)")

    upload = tenant_action(actions, "upload", run_upload, common, help="upload records as a new data version",
                           description="Validate a JSON Lines file of records ({id, subject?, prompt, "
                           "response} per line) and store it as a new immutable data version.")
    upload.add_argument("records", type=Path, help="records file (.jsonl or .jsonl.gz)")
    upload.add_argument("--parent", help="data version this one derives from")

    keys = actions.add_parser("keys", help="API keys: issue, list, revoke, admin")
    key_actions = keys.add_subparsers(dest="key_action", metavar="KEY_ACTION", required=True)
    issue = tenant_action(key_actions, "issue", run_keys_issue, common, help="issue a tenant API key (printed once)")
    issue.add_argument("--label", help="note stored with the key")
    tenant_action(key_actions, "list", run_keys_list, common, help="list a tenant's key ids")
    revoke = tenant_action(key_actions, "revoke", run_keys_revoke, common, help="revoke a tenant key by id")
    revoke.add_argument("key_id")
    admin = tenant_action(key_actions, "admin", run_keys_admin, common, name=False,
                          help="create the admin key if none exists (printed once)")
    admin.add_argument("--rotate", action="store_true", help="replace the stored admin key")

    receipts = tenant_action(actions, "receipts", run_receipts, common, help="show erasure receipts (JSON)")
    receipts.add_argument("--status", choices=["pending", "running", "published", "failed", "rejected"])
    receipts.add_argument("--id", dest="request_id", help="one request id")

    purge = tenant_action(actions, "purge", run_purge, common, help="delete superseded versions holding erased records",
                          description="Delete adapter and data versions that are not HEAD's and still hold "
                          "records of erasures published more than --grace seconds ago; log it in the receipts.")
    purge.add_argument("--grace", type=float, help="seconds after publication (default ERASER_S3_PURGE_GRACE_SECONDS or 60)")
    purge.add_argument("--dry-run", action="store_true", help="report what would be deleted")

    register_cluster_commands(actions, common)


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
    with open_cli_store(args) as store:
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
    with open_cli_store(args) as store:
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
    with open_cli_store(args) as store:
        for name in store.list_tenants():
            print(name)
    return 0


def run_show(args: argparse.Namespace) -> int:
    with open_cli_store(args) as store:
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
    with open_cli_store(args) as store:
        version = store.put_dataset(args.name, read_jsonl(args.records), parent=args.parent)
        manifest = store.get_data_manifest(args.name, version)
        print(f"tenant {args.name}: data version {version} ({manifest.records} records, {len(manifest.shards)} shards)")
    return 0


def run_keys_issue(args: argparse.Namespace) -> int:
    with open_cli_store(args) as store:
        api_key = store.issue_key(args.name, label=args.label)
    print(api_key)
    print("store this key now: it is shown once and kept only as a hash", file=sys.stderr)
    return 0


def run_keys_list(args: argparse.Namespace) -> int:
    with open_cli_store(args) as store:
        for key in store.list_keys(args.name):
            print(f"{key.key_id}  {key.created_at.isoformat()}  {key.label or ''}".rstrip())
    return 0


def run_keys_revoke(args: argparse.Namespace) -> int:
    from tenants.errors import AuthError

    with open_cli_store(args) as store:
        if not store.revoke_key(args.name, args.key_id):
            raise AuthError(f"tenant {args.name!r} has no key {args.key_id!r}")
    print(f"tenant {args.name}: key {args.key_id} revoked")
    return 0


def run_keys_admin(args: argparse.Namespace) -> int:
    with open_cli_store(args) as store:
        api_key = store.rotate_admin_key() if args.rotate else store.ensure_admin_key()
    if api_key is None:
        print("an admin key already exists (or ERASER_ADMIN_KEY is set); use --rotate to replace it", file=sys.stderr)
        return 0
    print(api_key)
    print("store this key now: it is shown once and kept only as a hash", file=sys.stderr)
    return 0


def run_receipts(args: argparse.Namespace) -> int:
    with open_cli_store(args) as store:
        if args.request_id:
            _print_json(store.get_receipt(args.name, args.request_id).model_dump(mode="json"))
        else:
            _print_json([r.model_dump(mode="json") for r in store.list_receipts(args.name, args.status)])
    return 0


def run_purge(args: argparse.Namespace) -> int:
    from tenants.errors import VersionNotFoundError

    with open_cli_store(args) as store:
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
