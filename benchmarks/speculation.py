"""Speculative decoding at batch 1, side by side: each drafting mode against plain decoding
of the same compiled engine kind, rounds interleaved (every mode decodes each prompt in
turn), medians over rounds x prompts.

    python -m benchmarks.speculation [--ckpt runs/quickstart/ckpt] [--rounds 6]
                                     [--prompts 4] [--tokens 64] [--threads 1,2] [--eager]
                                     [--quantize int8]

Modes: plain; one and two lookup drafts (`lookup_drafts`: what followed the last time the
same two tokens appeared); with an MTP module, its draft alone and its draft then one
lookup draft (`speculative=True`). Greedy; every mode's tokens are checked against plain
decoding's. Prompts are 16 tokens of the stdlib corpus (as benchmarks/decode.py's).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from benchmarks.decode import ns_run, prompt_maker
from nanoseek.infer import Engine
from nanoseek.utils import format_table


def modes(has_mtp: bool) -> dict[str, dict]:
    out = {
        "plain": {},
        "1 lookup draft": {"lookup_drafts": 1},
        "2 lookup drafts": {"lookup_drafts": 2},
    }
    if has_mtp:
        out["MTP draft"] = {"speculative": True, "lookup_drafts": 0}
        out["MTP draft + 1 lookup"] = {"speculative": True}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ckpt", default="runs/quickstart/ckpt")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--eager", action="store_true", help="eager engines (default: compiled)")
    ap.add_argument("--quantize", choices=["int8"], help="every engine with int8 weights")
    args = ap.parse_args(argv)
    ckpt = Path(args.ckpt)
    if not (ckpt / "config.json").exists():
        raise SystemExit(f"no checkpoint at {ckpt}: run `make run` first, or pass --ckpt")
    model = Engine.load(ckpt).model
    prompts = prompt_maker(ckpt, model.config.vocab_size)(args.prompts).tolist()
    n, threads = args.tokens, [int(t) for t in args.threads.split(",")]
    kind = {"compile": not args.eager, "quantize": args.quantize}
    engines = {
        name: Engine(model, max_batch=1, max_len=16 + n + 8, adaptive=True, **kind, **kw)
        for name, kw in modes(bool(model.mtp)).items()
    }
    speeds: dict = {}
    tokens: dict = {}
    for r in range(args.rounds):
        for T in threads:
            torch.set_num_threads(T)
            for name, eng in engines.items():
                for i, p in enumerate(prompts):
                    got: list = []
                    speeds.setdefault((T, name), []).append(ns_run(eng, [p], n, got)[1])
                    tokens.setdefault((name, i), got[0])
            print(f"  round {r + 1}/{args.rounds} done", flush=True)
    rows = []
    for T in threads:
        base = statistics.median(speeds[(T, "plain")])
        for name, eng in engines.items():
            tps = statistics.median(speeds[(T, name)])
            same = all(tokens[(name, i)] == tokens[("plain", i)] for i in range(len(prompts)))
            st = eng.spec_stats
            acc = f"{st.acceptance:.0%}" if eng.drafting else ""
            per = f"{(st.steps + st.accepted) / st.steps:.2f}" if st.steps else ""
            rows.append(
                (T, name, f"{tps:,.0f}", f"{tps / base:.2f}x", acc, per, "yes" if same else "NO")
            )
    print(
        f"\nspeculative decoding at batch 1, {ckpt}, {'eager' if args.eager else 'compiled'}, "
        f"{args.quantize or 'fp32'}, greedy, prompt 16, {n} new tokens; medians of {args.rounds} rounds x "
        f"{len(prompts)} prompts, modes interleaved"
    )
    header = (
        "threads",
        "drafts",
        "tok/s",
        "vs plain",
        "acceptance",
        "tokens a verify step",
        "tokens = plain",
    )
    print(format_table(rows, header=header))


if __name__ == "__main__":
    main()
