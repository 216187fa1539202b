"""Entry point of the `eraser` command.

Each command group lives in its own module exposing ``register(subparsers)``; the modules import
heavy libraries (torch, ray, vllm) inside their handlers so that ``eraser --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Command modules, in the order `eraser --help` lists them. A module that is missing (a layer
# not installed) is skipped rather than breaking the other commands.
COMMAND_MODULES = (
    "cli.model_cmd",
    "cli.train_cmd",
    "cli.erase_cmd",
    "cli.tenants_cmd",
    "cli.serve_cmd",
    "cli.demo_cmd",
    "cli.bench_cmd",
)


class CommandError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eraser",
        description="Verified machine unlearning for tenant LoRA adapters (LLMEraser influence updates).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name == name:
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.handler(args) or 0)
    except CommandError as error:
        print(f"eraser: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eraser: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # typed library errors become one clear line
        from cli.errors import user_facing

        message = user_facing(error)
        if message is None:
            raise
        print(f"eraser: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
