"""`nanoseek data prepare|info`: build and inspect tokenizer + token shards."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="tokenizer + token shards from a corpus")
    actions = p.add_subparsers(dest="data_command", metavar="<action>")
    p.set_defaults(func=lambda args: p.print_help())

    pp = actions.add_parser(
        "prepare",
        help="train a tokenizer and write train/val token shards (skips what is already done)",
    )
    pp.add_argument(
        "--data",
        required=True,
        help="'stdlib' (this Python's standard library, no download), a directory, a file, "
        "or a glob; .jsonl and .parquet are read by --text-field",
    )
    pp.add_argument("--out", required=True, type=Path, help="output directory")
    pp.add_argument(
        "--vocab-size", type=int, default=8192, help="BPE vocabulary size (default 8192)"
    )
    pp.add_argument(
        "--tokenizer", default=None, help="use this tokenizer.json instead of training one"
    )
    pp.add_argument("--text-field", default="text", help="text field of .jsonl/.parquet rows")
    pp.add_argument(
        "--ext", default=None, help="file extensions to read from a directory, e.g. .py,.md"
    )
    pp.set_defaults(func=_prepare)

    pi = actions.add_parser("info", help="check a shard directory and print its summary")
    pi.add_argument("dir", type=Path)
    pi.set_defaults(func=_info)


def _prepare(args: argparse.Namespace) -> int:
    from nanoseek.data import prepare

    prepare(args.data, args.out, args.vocab_size, args.tokenizer, args.text_field, args.ext)
    return 0


def _info(args: argparse.Namespace) -> int:
    from nanoseek.data import check_shards, read_meta, summary

    meta = read_meta(args.dir)
    check_shards(args.dir, meta)
    print(summary(meta, args.dir, " (ok)"))
    return 0
