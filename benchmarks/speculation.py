"""Speculative decoding, side by side: each drafting mode against plain decoding of the
same compiled engine kind, rounds interleaved (every mode decodes each prompt in turn),
medians over rounds (x prompts at batch 1).

    python -m benchmarks.speculation [--ckpt runs/quickstart/ckpt] [--rounds 6]
                                     [--prompts 4] [--tokens 64] [--threads 1,2]
                                     [--batch 1[,8,16]] [--eager] [--quantize int8]

Modes: plain; 1, 2, 4 and 8 lookup drafts (`lookup_drafts`: what followed the last time
the same two tokens appeared, copied on as a loop); with an MTP module, its draft alone and
its draft then 1 or 3 lookup drafts (`speculative=True`). Every engine is adaptive (drafts
only while it pays). Greedy; every mode's tokens are checked against plain decoding's.
Prompts are 16 tokens of the stdlib corpus (as benchmarks/decode.py's). --batch B > 1 runs
the first B prompts together, one fresh engine per batch size and mode; its "tokens a
verify step" counts per sequence as if every verify step held all B (exact at batch 1).
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
    out = {"plain": {}, "1 lookup draft": {"lookup_drafts": 1}}
    out |= {f"{k} lookup drafts": {"lookup_drafts": k} for k in (2, 4, 8)}
    if has_mtp:
        out["MTP draft"] = {"speculative": True, "lookup_drafts": 0}
        out["MTP draft + 1 lookup"] = {"speculative": True, "lookup_drafts": 1}
        out["MTP draft + 3 lookups"] = {"speculative": True, "lookup_drafts": 3}
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
    ap.add_argument(
        "--batch",
        default="1",
        help="batch sizes, e.g. 1,8,16: each mode with B prompts at once, a fresh engine per B",
    )
    ap.add_argument("--eager", action="store_true", help="eager engines (default: compiled)")
    ap.add_argument("--quantize", choices=["int8"], help="every engine with int8 weights")
    args = ap.parse_args(argv)
    ckpt = Path(args.ckpt)
    if not (ckpt / "config.json").exists():
        raise SystemExit(f"no checkpoint at {ckpt}: run `make run` first, or pass --ckpt")
    model = Engine.load(ckpt).model
    n, threads = args.tokens, [int(t) for t in args.threads.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    prompts = prompt_maker(ckpt, model.config.vocab_size)(max(args.prompts, *batches)).tolist()
    kind = {"compile": not args.eager, "quantize": args.quantize}
    drafting = modes(bool(model.mtp))
    engines = {
        (B, name): Engine(model, max_batch=B, max_len=16 + n + 16, adaptive=True, **kind, **kw)
        for B in batches
        for name, kw in drafting.items()
    }
    # batch 1: each of --prompts prompts alone; batch B: the first B prompts together
    runs = {B: [[i] for i in range(args.prompts)] if B == 1 else [list(range(B))] for B in batches}
    speeds: dict = {}
    tokens: dict = {}
    for r in range(args.rounds):
        for T in threads:
            torch.set_num_threads(T)
            for (B, name), eng in engines.items():
                for run in runs[B]:
                    got: list = []
                    tps = ns_run(eng, [prompts[i] for i in run], n, got)[1]
                    speeds.setdefault((T, B, name), []).append(tps)
                    for i, ids in zip(run, got, strict=True):
                        tokens.setdefault((B, name, i), ids)
            print(f"  round {r + 1}/{args.rounds} done", flush=True)
    rows = []
    for B in batches:
        for T in threads:
            base = statistics.median(speeds[(T, B, "plain")])
            for name in drafting:
                eng = engines[(B, name)]
                tps = statistics.median(speeds[(T, B, name)])
                same = all(
                    tokens[(B, name, i)] == tokens[(B, "plain", i)] for run in runs[B] for i in run
                )
                st = eng.spec_stats  # over all rounds and thread counts
                acc = f"{st.acceptance:.0%}" if eng.drafting else ""
                # per sequence: exact at batch 1; at B, as if every step held all B
                per = f"{1 + st.accepted / B / st.steps:.2f}" if st.steps else ""
                drafted = f"{st.steps}/{st.steps + st.plain_steps}" if eng.drafting else ""
                rows.append(
                    (
                        B,
                        T,
                        name,
                        f"{tps:,.0f}",
                        f"{tps / base:.2f}x",
                        acc,
                        per,
                        drafted,
                        "yes" if same else "NO",
                    )
                )
    print(
        f"\nspeculative decoding, {ckpt}, {'eager' if args.eager else 'compiled'}, "
        f"{args.quantize or 'fp32'}, greedy, prompt 16, {n} new tokens; medians of {args.rounds} "
        f"rounds (x {args.prompts} prompts at batch 1), modes interleaved; adaptive drafting"
    )
    header = (
        "batch",
        "threads",
        "drafts",
        "tok/s",
        "vs plain",
        "acceptance",
        "tokens a verify step",
        "steps drafted",
        "tokens = plain",
    )
    print(format_table(rows, header=header))


if __name__ == "__main__":
    main()
