"""`eraser model init`: build the small local base model (tokenizer + Llama) in Hugging Face format."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    model = subparsers.add_parser("model", help="build the small local base model")
    actions = model.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = actions.add_parser(
        "init",
        help="train a tokenizer on a corpus, build a Llama base (head_dim 32), optionally pretrain it",
        description="Build a small Llama-architecture base model in Hugging Face format. No model hub is "
        "needed: the tokenizer is trained on --corpus and the weights are initialised from --seed, then "
        "optionally pretrained on --pretrain-corpus (text that is not the tenants' records).",
    )
    init.add_argument("--out", required=True, type=Path, help="output directory (HF format)")
    init.add_argument("--corpus", required=True, type=Path, help="records (.jsonl) or text (.txt, one document per line) for the tokenizer")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--vocab-size", type=int, default=2048)
    init.add_argument("--hidden-size", type=int, default=128)
    init.add_argument("--layers", type=int, default=2)
    init.add_argument("--heads", type=int, default=4, help="attention heads; hidden-size/heads must be >= 32 for vLLM")
    init.add_argument("--pretrain-corpus", type=Path, help="text or records to pretrain the base on (default: none)")
    init.add_argument("--pretrain-steps", type=int, default=0)
    init.set_defaults(handler=run_init)


def read_texts(path: Path) -> list[str]:
    """Texts of a corpus file: records (either form) in the built-in format for .jsonl, non-empty lines otherwise."""
    from eraser.records import corpus_text, load_records

    if not path.is_file():
        raise FileNotFoundError(f"corpus not found: {path}")
    if path.suffix == ".jsonl":
        return [corpus_text(r) for r in load_records(path)]
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def run_init(args: argparse.Namespace) -> int:
    from cli.progress import loss_bar
    from eraser.model import BaseModelConfig, build_base_model, save_base_model, train_tokenizer
    from eraser.training import pretrain_base

    texts = read_texts(args.corpus)
    tokenizer = train_tokenizer(texts, vocab_size=args.vocab_size)
    config = BaseModelConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                             intermediate_size=2 * args.hidden_size, num_hidden_layers=args.layers,
                             num_attention_heads=args.heads, num_key_value_heads=args.heads)
    model = build_base_model(config, tokenizer, seed=args.seed)
    provenance = {"config": config.__dict__, "seed": args.seed, "corpus": str(args.corpus), "pretrain_steps": args.pretrain_steps}
    if args.pretrain_steps > 0:
        if args.pretrain_corpus is None:
            raise FileNotFoundError("--pretrain-steps needs --pretrain-corpus")
        with loss_bar("pretraining base") as bar:
            report = pretrain_base(model, tokenizer, read_texts(args.pretrain_corpus), steps=args.pretrain_steps,
                                   seed=args.seed, progress=bar)
        provenance["pretrain_final_loss"] = report.final_loss
    save_base_model(model, tokenizer, args.out, provenance)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"base model: {n_params / 1e6:.2f} M parameters, vocabulary {len(tokenizer)}, written to {args.out}")
    return 0
