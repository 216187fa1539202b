"""What the commands that work on the tenant store share: where the store is (``--data-dir`` for the embedded
one), opening it for a command's duration, a tenant subcommand's shape, and the store section of a ServeConfig.

The store is the configured S3 (``ERASER_S3_ENDPOINT``, ``ERASER_S3_BUCKET``, ``ERASER_S3_PREFIX``,
credentials the usual AWS way) or, when no endpoint is set, an embedded SeaweedFS whose data lives
in ``--data-dir`` / ``$ERASER_HOME`` (default ``./.eraser``), started for the command's duration.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

STORE_HELP = (
    "Uses ERASER_S3_ENDPOINT/ERASER_S3_BUCKET/ERASER_S3_PREFIX when set; otherwise starts an embedded "
    "SeaweedFS with its data in --data-dir (default $ERASER_HOME or ./.eraser)."
)


def add_data_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", type=Path, default=None,
        help="embedded store directory when no ERASER_S3_ENDPOINT is set (default: $ERASER_HOME or ./.eraser)",
    )


def store_parent() -> argparse.ArgumentParser:
    """A parent parser holding ``--data-dir``, for the subcommands that open the store."""
    common = argparse.ArgumentParser(add_help=False)
    add_data_dir_argument(common)
    return common


def open_cli_store(args: argparse.Namespace) -> Any:
    """The store for ``args`` (a context manager: an embedded SeaweedFS runs until it exits)."""
    from tenants.embedded import open_store

    return open_store(data_dir=args.data_dir)


def tenant_action(actions: Any, verb: str, handler: Callable[[argparse.Namespace], int],
                  parents: list[argparse.ArgumentParser], *, name: bool = True, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand ``verb`` of ``actions`` running ``handler``, with ``parents``' flags and, unless
    ``name=False``, the tenant NAME as its first argument."""
    parser = actions.add_parser(verb, parents=parents, **kwargs)
    if name:
        parser.add_argument("name", help="tenant name: lowercase letters, digits and '-'")
    parser.set_defaults(handler=handler)
    return parser


def serve_store_args(settings: Any) -> dict[str, Any]:
    """A ServeConfig's ``store`` section for the store of ``settings`` (credentials only where set)."""
    store: dict[str, Any] = {"endpoint": settings.endpoint, "bucket": settings.bucket, "prefix": settings.prefix,
                             "region": settings.region}
    if settings.access_key:
        store["access_key"] = settings.access_key
    if settings.secret_key is not None:
        store["secret_key"] = settings.secret_key.get_secret_value()
    return store
