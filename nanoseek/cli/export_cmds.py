"""`nanoseek export`: a checkpoint as a file other runtimes load (GGUF for llama.cpp)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a checkpoint as GGUF, for llama.cpp, ollama and LM Studio",
        description="Write a checkpoint as one GGUF file (llama.cpp architecture deepseek2, "
        "tokenizer and chat template included). Example: nanoseek export runs/small "
        "--format gguf --out small.gguf",
    )
    p.add_argument("ckpt", help="checkpoint or run directory (with tokenizer.json)")
    p.add_argument("--format", default="gguf", choices=["gguf"], help="output format")
    p.add_argument("--out", required=True, help="the file to write, e.g. model.gguf")
    p.add_argument(
        "--dtype",
        default="f32",
        help="f32 (exact), f16, or q8_0 (8-bit blocks; rows not a multiple of 32 stay f16)",
    )
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from nanoseek.export import export_gguf

    export_gguf(args.ckpt, args.out, dtype=args.dtype)
    return 0
