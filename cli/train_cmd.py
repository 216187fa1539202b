"""`eraser train`: LoRA-train an adapter on records (deterministic for a seed)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)


def add_format_arguments(parser: argparse.ArgumentParser, recorded: bool = False) -> None:
    """How records become tokens: the same for training, erasing and serving (eraser.rendering)."""
    default = "the one recorded in the adapter's eraser.json, else " if recorded else ""
    parser.add_argument("--chat-template", type=Path, default=None,
                        help=f"Jinja chat template file to render records with (default: {default}the base "
                        "tokenizer's own; the built-in 'Question: ... Answer:' format for a base without one)")
    parser.add_argument("--max-length", type=int, default=None,
                        help=f"token limit of a rendered record; longer ones lose their oldest tokens "
                        f"(default: {default}512)")


def add_precision_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the model computes and the precision of its weights (eraser.devices)."""
    parser.add_argument("--device", default="cpu",
                        help="device the model computes on: cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="precision of the base model's weights; the LoRA factors, gradients, curvature and "
                        "solver vectors stay float32 (default float32)")


def precision_from_args(args: argparse.Namespace):
    """``(torch device, torch dtype)`` of the flags, refused by name before anything is loaded."""
    from eraser.devices import parse_device, parse_dtype

    return parse_device(args.device), parse_dtype(args.dtype)


def precision_manifest(args: argparse.Namespace) -> dict:
    """What eraser.json records of where and in what precision the adapter was computed."""
    return {"device": args.device, "dtype": args.dtype}


def format_from_args(args: argparse.Namespace, recorded: dict | None = None):
    """The RecordFormat the flags ask for, falling back to ``recorded`` (an eraser.json "format")."""
    from eraser.rendering import DEFAULT_MAX_LENGTH, RecordFormat

    recorded = recorded or {}
    if args.chat_template is not None:
        if not args.chat_template.is_file():
            raise FileNotFoundError(f"chat template not found: {args.chat_template}")
        template = args.chat_template.read_text(encoding="utf-8")
    else:
        template = recorded.get("chat_template")
    length = args.max_length if args.max_length is not None else recorded.get("max_length", DEFAULT_MAX_LENGTH)
    return RecordFormat(chat_template=template, max_length=length)


def format_manifest(tokenizer) -> dict:
    """What eraser.json records of the rendering: the template actually used and the limit."""
    return {"chat_template": tokenizer.chat_template, "max_length": tokenizer.model_max_length}


def recipe_from_args(args: argparse.Namespace):
    from eraser.training import TrainConfig

    return TrainConfig(rank=args.rank, alpha=args.alpha, epochs=args.epochs, lr=args.lr,
                       batch_size=args.batch_size, seed=args.seed)


def register(subparsers) -> None:
    train = subparsers.add_parser(
        "train",
        help="LoRA-train an adapter on records",
        description="Train a LoRA adapter (all linear layers) on JSON Lines records, either form: "
        '{"id", "subject", "prompt", "response"} or the OpenAI chat fine-tuning form {"id", "subject", '
        '"messages": [...]} (loss on assistant turns only; id optional there, derived from the content). '
        "Records are rendered with the base tokenizer's chat template (or --chat-template). The result is a "
        "PEFT directory with eraser.json. Same recipe and seed give the same adapter.",
    )
    train.add_argument("--base", required=True, type=Path, help="base model directory (HF format)")
    train.add_argument("--data", required=True, type=Path, help="training records (.jsonl)")
    train.add_argument("--out", required=True, type=Path, help="adapter output directory")
    train.add_argument("--heldout-fraction", type=float, default=0.1,
                       help="fraction of --data set aside, never trained on: the reference population of the "
                       "membership test `eraser erase` runs (split by a hash of the subject and record id and "
                       "--seed, recorded in eraser.json; default 0.1, 0 disables and leaves erasures unverifiable)")
    train.add_argument("--heldout-unit", choices=("mixed", "record"), default="mixed",
                       help="mixed (default): half the held-out share is whole subjects (the reference for "
                       "erasing a subject), half single records of the others; record: every record by itself")
    add_recipe_arguments(train)
    add_format_arguments(train)
    add_precision_arguments(train)
    train.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> int:
    from cli.progress import loss_bar
    from eraser.model import load_base, load_tokenizer
    from eraser.records import load_records
    from eraser.training import add_lora, train_lora
    from eraser.update import save_adapter
    from eraser.reference import split_heldout

    config = recipe_from_args(args)
    device, dtype = precision_from_args(args)
    records, heldout = split_heldout(load_records(args.data), args.heldout_fraction, args.seed, args.heldout_unit)
    tokenizer = load_tokenizer(args.base, format_from_args(args))
    model = add_lora(load_base(args.base, dtype, device), config)
    with loss_bar(f"training LoRA on {len(records)} records") as bar:
        report = train_lora(model, tokenizer, records, config, progress=bar)
    save_adapter(model, args.out, {"version": "v000001", "parent_version": None, "recipe": config.to_dict(),
                                   "format": format_manifest(tokenizer), "precision": precision_manifest(args),
                                   "heldout": {"fraction": args.heldout_fraction, "seed": args.seed,
                                               "unit": args.heldout_unit, "count": len(heldout)},
                                   "training": {"steps": report.steps, "final_loss": report.final_loss,
                                                "wall_time_s": report.wall_time_s, "records": report.records}})
    print(f"adapter written to {args.out}: {report.steps} steps on {len(records)} records "
          f"({len(heldout)} held out), final loss {report.final_loss:.4f}, {report.wall_time_s:.1f}s")
    return 0
