"""GRPO at toy scale: held-out accuracy before and after, against wall time, for the loss
variants from the same SFT'd checkpoint, and where the time goes (rollouts vs updates).

    python -m benchmarks.grpo [--init runs/r1/sft] [--minutes 10] [--variants dr_grpo,grpo,dapo]

The starting checkpoint is `make r1`'s SFT model (arithmetic, 2-3 digit + and -); when it
is absent it is built here with r1's data, base and SFT stages. Every variant runs the same
recipe for the same wall time (nanoseek.r1.rl_stage: 16 problems x 8 completions per step,
lr 3e-5, one update per batch), with held-out greedy accuracy on 200 problems every
--eval-every steps. Prints a table and saves docs/grpo.png (held-out accuracy and reward
against seconds).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from nanoseek.train.metrics import read_metrics
from nanoseek.utils import format_table


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--init", default="runs/r1/sft", help="the SFT'd starting checkpoint")
    ap.add_argument("--minutes", type=float, default=10.0, help="GRPO wall time per variant")
    ap.add_argument("--variants", default="dr_grpo,grpo,dapo")
    ap.add_argument("--out", default="runs/bench_grpo")
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--png", default="docs/grpo.png")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    from nanoseek import r1

    init, out = Path(args.init), Path(args.out)
    if not (init / "ckpt" / "config.json").is_file() and not (init / "config.json").is_file():
        print(f"{init} is missing: building it with r1's data, base and SFT stages", flush=True)
        root = init.parent
        chats, tokenizer = r1.make_data(root / "data", 30_000)
        base = r1.make_base(root / "base", tokenizer)
        r1.sft_stage(base, chats, init, 600, args.threads)

    runs = {}
    for variant in args.variants.split(","):
        print(f"\n== {variant}, {args.minutes:g} minutes from {init}", flush=True)
        runs[variant] = out / variant
        r1.rl_stage(
            init,
            runs[variant],
            args.minutes,
            args.threads,
            variant=variant,
            eval_every=args.eval_every,
            progress=False,
        )

    rows = []
    for variant, run in runs.items():
        s = json.loads((run / "summary.json").read_text())
        evals = [
            r["val_accuracy"]
            for r in read_metrics(run / "metrics.jsonl")
            if r.get("val_accuracy") is not None
        ]
        before, after = s["held_out_accuracy_start"], s["held_out_accuracy_end"]
        busy = s["rollout_seconds"] + s["update_seconds"]
        rows.append(
            (
                variant,
                f"{s['beta']:g}",
                s["steps"],
                f"{before:.1%}",
                f"{after:.1%}",
                f"{100 * (after - before):+.1f}",
                f"{max(evals):.1%}",
                f"{s['rollout_seconds']:.0f} ({s['rollout_seconds'] / busy:.0%})",
                f"{s['update_seconds']:.0f}",
                f"{s['eval_seconds']:.0f}",
            )
        )
    header = (
        "variant",
        "beta",
        "steps",
        "before",
        "after",
        "gain (points)",
        "best",
        "rollout s",
        "update s",
        "eval s",
    )
    print(
        format_table(
            rows,
            f"\nheld-out accuracy (n=200, greedy) after {args.minutes:g} minutes of GRPO",
            header,
        )
    )
    plot(runs, args.png)
    print(f"plot: {args.png}")


def plot(runs: dict[str, Path], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, rew_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (variant, run) in enumerate(runs.items()):
        recs = read_metrics(run / "metrics.jsonl")
        ev = np.array(
            [(r["elapsed"], r["val_accuracy"]) for r in recs if r.get("val_accuracy") is not None]
        )
        rw = np.array([(r["elapsed"], r["reward"]) for r in recs if r.get("reward") is not None])
        acc_ax.plot(ev[:, 0], ev[:, 1], "o-", color=f"C{i}", label=variant)
        w = max(1, len(rw) // 15)
        smooth = np.convolve(rw[:, 1], np.ones(w) / w, mode="valid")
        rew_ax.plot(rw[w - 1 :, 0], smooth, color=f"C{i}", label=f"{variant} (mean of {w})")
    acc_ax.set_ylabel("held-out accuracy (greedy)")
    rew_ax.set_ylabel("mean reward of the rollouts")
    for ax in (acc_ax, rew_ax):
        ax.set_xlabel("seconds")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("GRPO on arithmetic from the same SFT checkpoint (2 CPU cores, 1 thread)")
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
