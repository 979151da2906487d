"""DeepSeek's claim, at toy scale: does the MoE (`small`: MLA + DeepSeekMoE) reach the dense
model's (`dense-small`: same activated parameters) final validation loss with less compute?

    python -m benchmarks.moe_vs_dense [--tokens 8e5] [--data data/stdlib-8k] [--out runs/moe_vs_dense]
                                      [--compile] [--dtype fp32] [--sequential] [--moe-lr LR]
                                      [--model KEY=VALUE ...] [--moe KEY=VALUE ...]
                                      [--train KEY=VALUE ...]
                                      [--moe-train KEY=VALUE ...] [--moe-budget FRACTION]
                                      [--recipe KEY=VALUE[,KEY=VALUE...] ...] [--branches F,F]
                                      [--report | --resume] [--against OUT]

Both train on the same shards, batches and token budget with the same recipe (but what
--moe-lr / --moe-train change); validation loss is measured every --eval-every steps on the
same windows. By default the two trainings run side by side, at the same time, each on half
the cores: a shared machine's drift (other jobs, clock and cache state) then falls on both
alike, which two 15-minute runs one after the other did not give (their tokens/s ratio moved
by 0.1 between sessions); on Linux the two trainings end with the benchmark, however it is
killed. Side by side they draw no progress bars: every ten minutes a line says where each
run stands (tokens of its budget, last validation loss, speed, time left). --sequential
runs them one after the other on all the cores; on a GPU (`--train device=cuda`, or `auto`
where there is one) they always run one after the other. --model KEY=VALUE overrides a
field of both models' configs (their shape: e.g. --model hidden_size=384 --model
moe_intermediate_size=384), the dense model's MLP kept as
wide as the MoE's shared and routed experts a token; --moe KEY=VALUE then a field of the
MoE's alone (e.g. --moe routed_scaling_factor=1.0) to try a recipe; --train KEY=VALUE a
training setting of both (e.g. --train batch_size=16), --moe-train KEY=VALUE one of the
MoE's alone (the two models need not want the same batch or LR; --moe-lr LR is --moe-train
lr=LR). --recipe, given twice or more, tunes both: each recipe (training settings on top of
--train) trains both models, and each model is compared at the recipe where it ended lowest
(a table of all of them first), so neither is judged at a batch or LR that suits only the
other. --moe-budget F trains the MoE on F times the dense model's tokens, with its LR and
balancing schedules set for that budget: the iso-loss question asked directly (does a
shorter MoE run, decayed in full, end at or below the dense final loss, and in what fraction
of its wall time?), where the reach within a full-budget MoE run reads a loss from the
middle of its decay. --branches 0.6,0.7,0.8 asks it for several budgets at once: the MoE's
run keeps a checkpoint at every evaluation, and as soon as it ends it is decayed from those
nearest where each budget's decay starts (`nanoseek train --decay-from`; each branch is the
run of that budget, for the cost of its decay), two at a time, the first in the slot the
MoE's run frees (beside the dense run, if that is still training); with --moe-budget B the
budgets must be below B, the MoE run's own. A table gives each budget's decayed loss and
training time against the dense model's, and the budget where the MoE's decayed loss meets
the dense final loss, interpolated (where no two budgets bracket it, extrapolated from the two
nearest and printed as an estimate). --report trains nothing: given the flags of a finished
benchmark, it prints and plots the runs in --out again; --against OUT sets them beside
another finished run of the same flags but --seed (losses and leads at the same tokens, each
pair's multiplier before the decay), so a lead can be told from one seed's luck. --resume,
given with the flags a killed benchmark was started with, goes on with its runs, each from its last checkpoint
(add --train save_every=N for the dense run to keep one; the MoE keeps one at every
evaluation with --branches), so a run longer than a sitting can span several; the wall
times add up over the pieces, so compare them only where every piece ran on one kind of
machine (the tokens/s ratio, both read over the same seconds, holds either way). Prints a
table, the MoE's lead over the run (at 25/50/75/100% of the tokens), the lead as a compute
multiplier read before either run's decay (`token_multiplier`: the dense tokens for the
MoE's loss over the MoE's tokens) and the share of the dense wall time it implies, where it
reaches the dense final loss, its expert load (the worst early in the run, where tokens
herd onto few experts, and at the end), and saves a plot of validation loss against training
FLOPs and against wall time in --out (moe_vs_dense.png; --png puts it elsewhere), so a run
never overwrites the README's figures.
Like `nanoseek train`, it runs on tcmalloc where that is installed (NANOSEEK_TCMALLOC=0: glibc).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import json
import multiprocessing
import os
import shutil
import signal
import sys
import textwrap
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from nanoseek.config import ModelConfig, dense_twin, get_preset, param_counts
from nanoseek.data import prepare
from nanoseek.device import preload_tcmalloc, resolve_device
from nanoseek.train import TrainConfig, make_config, train
from nanoseek.train.checkpoint import find_checkpoint, read_train_state
from nanoseek.train.metrics import read_metrics
from nanoseek.utils import format_table, human


def curve(run: Path) -> dict[str, np.ndarray]:
    recs = [r for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]
    fpt = json.loads((run / "summary.json").read_text())["flops_per_token"]
    tokens = np.array([r["tokens"] for r in recs], dtype=float)
    return {
        "tokens": tokens,
        "flops": tokens * fpt,
        "seconds": np.array([r["train_seconds"] for r in recs]),
        "val": np.array([r["val_loss"] for r in recs]),
    }


def rate_until(recs: list[dict[str, Any]], elapsed: float) -> float:
    """Training tokens per training second over a run's steps (its metrics records) that
    ended within `elapsed` seconds of its start."""
    last = [r for r in recs if r["elapsed"] <= elapsed][-1]
    return last["tokens"] / last["train_seconds"]


def first_reach(c: dict[str, np.ndarray], target: float, key: str) -> float | None:
    """Linear interpolation of `key` where the validation curve first drops to `target`."""
    v = c["val"]
    for i in range(len(v)):
        if v[i] <= target:
            if i == 0:
                return float(c[key][0])
            f = (v[i - 1] - target) / (v[i - 1] - v[i])
            return float(c[key][i - 1] + f * (c[key][i] - c[key][i - 1]))
    return None


def nearest_kept(kept: dict[Path, int], target: float) -> Path:
    """The kept checkpoint (path -> its tokens) whose tokens are nearest `target`."""
    return min(kept, key=lambda p: abs(kept[p] - target))


def iso_budget(
    points: list[tuple[float, float, float]], target: float
) -> tuple[float, float] | str:
    """Decayed runs of several budgets (tokens, train seconds, final loss), fewest tokens
    first -> (tokens, seconds) where their final loss meets `target`, interpolated linearly
    between the two budgets around it; or why there is no such point ("below": the smallest
    budget already ends at or under it; "above": the largest does not reach it)."""
    if points[0][2] <= target:
        return "below"
    for (t0, s0, v0), (t1, s1, v1) in zip(points, points[1:], strict=False):
        if v1 <= target:
            f = (v0 - target) / (v0 - v1)
            return t0 + f * (t1 - t0), s0 + f * (s1 - s0)
    return "above"


def extrapolate_budget(
    points: list[tuple[float, float, float]], target: float
) -> tuple[float, float, float] | None:
    """Where no budget brackets `target` (see iso_budget): the budget where the decayed loss
    would meet it, read from the two budgets nearest it (the largest two if every budget ends
    above, the smallest two if every one ends below) with the loss straight in log2(tokens)
    and the seconds straight in tokens -> (tokens, seconds, nats a doubling of the tokens);
    None with fewer than two budgets or no gain from the tokens. An estimate, not a run: two
    nearby budgets give a noisy slope (the thirty-fourth session read 0.18 nats a doubling
    between 68% and 72%, where another seed's 72% and 100% gave 0.11)."""
    if len(points) < 2:
        return None
    (t0, s0, v0), (t1, s1, v1) = points[-2:] if points[-1][2] > target else points[:2]
    slope = (v0 - v1) / np.log2(t1 / t0)
    if slope <= 0:
        return None
    tokens = t1 * 2 ** ((v1 - target) / slope)
    return float(tokens), s1 + (tokens - t1) * (s1 - s0) / (t1 - t0), float(slope)


def expert_load(recs: list[dict[str, Any]], share: float = 0.1) -> tuple[float, int, float] | None:
    """The MoE's routing balance over a run (its metrics records' per-layer max/mean tokens
    per expert, averaged over the layers; 1 is even, E/k all tokens on one expert) ->
    (the worst step's value in the first `share` of the steps, that step, the mean over the
    last `share`); None for a run that logged no load. Early in a run every token's hidden
    state shares one direction, so the tokens agree on their experts (the "herd"), whatever
    the router's own weights do."""
    steps = [(r["step"], float(np.mean(r["load_max_mean"]))) for r in recs if "load_max_mean" in r]
    if not steps:
        return None
    n = max(1, round(len(steps) * share))
    worst_step, worst = max(steps[:n], key=lambda s: s[1])
    return worst, worst_step, float(np.mean([v for _, v in steps[-n:]]))


def lead_at(
    moe: dict[str, np.ndarray], dense: dict[str, np.ndarray], fractions: list[float]
) -> list[float | None]:
    """The MoE's lead (dense minus MoE validation loss, each curve interpolated linearly) at
    each fraction of the dense model's tokens; None where a curve does not cover that point
    (a --moe-budget run ends early; 0.1% short counts as the end). Where the lead is spent
    says whether the dense model catches up in its decay or before it."""
    leads: list[float | None] = []
    for f in fractions:
        t = f * dense["tokens"][-1]
        d, m = loss_at(dense, t), loss_at(moe, t)
        leads.append(None if d is None or m is None else d - m)
    return leads


def beside_seed(
    runs: dict[str, dict[str, np.ndarray]],
    other: dict[str, dict[str, np.ndarray]],
    fractions: list[float],
) -> list[tuple[float, list[float | None]]]:
    """Two pairs of runs of one benchmark (two seeds: `runs` and `other`, each by preset) at
    the same tokens, each fraction of this pair's dense tokens -> (tokens, [MoE, dense, lead;
    the other pair's MoE, dense, lead]), a loss None where its run does not reach that point
    (a lead None where either of its pair's does not). Whether the MoE's lead is one seed's
    luck shows in where the two leads part."""
    rows = []
    for f in fractions:
        t = f * runs["dense-small"]["tokens"][-1]
        row: list[float | None] = []
        for pair in (runs, other):
            moe, dense = (loss_at(pair[p], t) for p in ("small", "dense-small"))
            row += [moe, dense, None if moe is None or dense is None else dense - moe]
        rows.append((t, row))
    return rows


def loss_at(c: dict[str, np.ndarray], t: float) -> float | None:
    """A run's validation loss at `t` tokens, interpolated linearly; None outside its curve
    (a run whose batch grew ends a step's worth of tokens short: 0.1% counts as its end)."""
    if not c["tokens"][0] <= t <= c["tokens"][-1] * 1.001:
        return None
    return float(np.interp(t, c["tokens"], c["val"]))


def token_multiplier(
    moe: dict[str, np.ndarray],
    dense: dict[str, np.ndarray],
    moe_stable: float,
    dense_stable: float,
    span: tuple[float, float] = (0.25, 0.75),
) -> tuple[float, int] | None:
    """How many times the MoE's tokens the dense model needs for the same validation loss,
    read while both runs are still at their peak LR (`*_stable`: the token where each one's
    decay begins): for every MoE point in `span` of its stable phase, the dense tokens where
    its curve first meets that loss (interpolated, within its own stable phase), over the
    MoE's tokens -> (the median of those ratios, how many there were), or None. Under `wsd`
    the dense model's final loss is a decayed one, which an undecayed MoE curve meets only in
    its own decay, so the reach in a full run sits near 80-95% of the tokens whatever the
    lead; this reads the lead as a compute multiplier instead."""
    ratios = []
    keep = dense["tokens"] <= dense_stable
    d_tokens, d_val = dense["tokens"][keep], dense["val"][keep]
    for t, loss in zip(moe["tokens"], moe["val"], strict=True):
        if not span[0] * moe_stable <= t <= span[1] * moe_stable:
            continue
        met = first_reach({"val": d_val, "tokens": d_tokens}, float(loss), "tokens")
        if met is not None and met > d_tokens[0]:  # not met before the dense curve starts
            ratios.append(met / t)
    return (float(np.median(ratios)), len(ratios)) if ratios else None


def parse_override(item: str) -> tuple[str, Any]:
    """'key=value' -> (key, value as JSON where it parses: numbers, true, null; else text)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise SystemExit(f"--model, --moe, --train, --recipe take KEY=VALUE, got {item!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parse_recipe(text: str) -> dict[str, Any]:
    """--recipe 'lr=3e-3,batch_size=32' -> one candidate's training settings."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise SystemExit("--recipe takes KEY=VALUE[,KEY=VALUE...], got nothing")
    return train_overrides(items, [])[0]


ROLE = {"small": "MoE", "dense-small": "dense"}  # each preset's part in the comparison


def recipe_name(recipe: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in recipe.items()) or "the defaults"


def best_of(trials: list[dict[str, dict]], preset: str) -> int:
    """The trial (one recipe's summaries, by preset) where `preset` ended at its lowest
    validation loss."""
    return min(range(len(trials)), key=lambda i: trials[i][preset]["final_val_loss"])


# Fields the dense twin sets itself (it has no experts); `--model` applies the rest to both.
DENSE_OWN = frozenset(
    "first_k_dense_replace intermediate_size n_routed_experts n_shared_experts n_group "
    "topk_group".split()
)


def refuse_unknown_fields(shape: dict[str, Any]) -> None:
    """--model's keys must be model config fields."""
    unknown = shape.keys() - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise SystemExit(f"--model: no model config field {', '.join(sorted(unknown))}")


def model_overrides(shape: dict[str, Any], moe: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """--model (both models) and --moe (the MoE alone) -> each preset's model overrides. The
    dense twin keeps `dense-small`'s rule: an MLP as wide as the MoE's shared + routed experts
    a token, with the MoE's shape (before --moe's recipe changes, as top-k runs compare
    against the same dense model)."""
    refuse_unknown_fields(shape)
    if DENSE_OWN & shape.keys():
        raise SystemExit(
            f"--model cannot set {', '.join(sorted(DENSE_OWN & shape.keys()))}: the dense "
            "twin derives them; set the MoE's with --moe"
        )
    dense: dict[str, Any] = {}
    if shape:
        width = dense_twin(get_preset("small").replace(**shape)).intermediate_size
        dense = {**shape, "intermediate_size": width}
    return {"small": {**shape, **moe}, "dense-small": dense}


# Training settings the benchmark sets itself (its own flags, or what side by side needs).
FIXED = frozenset(
    "preset data out tokens eval_every overwrite seed compile dtype threads progress model "
    "keep_every decay_from".split()
)


def train_overrides(
    train: list[str], moe_train: list[str], moe_lr: float | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """--train and --moe-train items (and --moe-lr) -> (settings of both, the MoE's alone)."""
    both = dict(parse_override(item) for item in train)
    moe_only = dict(parse_override(item) for item in moe_train)
    if moe_lr is not None:
        moe_only["lr"] = moe_lr
    bad = sorted(FIXED & (both.keys() | moe_only.keys()))
    if bad:
        raise SystemExit(
            f"--train / --moe-train / --recipe cannot set {bad}: the benchmark's flags do"
        )
    return both, moe_only


def runs_side_by_side(sequential: bool, cores: int, device: torch.device) -> bool:
    """Side by side (half the cores each) only on a CPU: two trainings on one GPU would share
    it unevenly (and its host cores are not what limits them)."""
    return not sequential and cores >= 2 and device.type == "cpu"


def die_with(parent: int) -> None:
    """A training worker's initializer: Linux ends the worker (SIGTERM) when the benchmark's
    process dies, however it dies; killing the benchmark used to leave its two trainings
    running on the cores (their checkpoints stay, for `nanoseek train --resume`)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the line above: nothing will signal
        os._exit(1)


def run_both(
    configs: dict[str, TrainConfig],
    side_by_side: bool,
    then: Callable[[], dict[str, TrainConfig]] | None = None,
) -> dict[str, dict]:
    """Train every config -> {name: summary}: two at a time, one process each (spawned, so
    each sets its own thread count), or one after the other in this process. `then`, called
    when the MoE's run ("small") has ended, gives more configs (its decay branches): side by
    side they start at once, in the slot it frees, beside the dense run if that is still
    training; else after the rest. Side by side, where no progress bars are drawn, a line
    every PROGRESS_EVERY seconds says where each run stands."""
    if not side_by_side:
        done = {name: train(tc) for name, tc in configs.items()}
        return done | {name: train(tc) for name, tc in (then() if then else {}).items()}
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        2, mp_context=ctx, initializer=die_with, initargs=(os.getpid(),)
    ) as pool:
        futures = {name: pool.submit(train, tc) for name, tc in configs.items()}
        if then:
            wait_showing_progress(futures, configs, futures["small"])
            branches = then()
            configs = {**configs, **branches}
            futures |= {name: pool.submit(train, tc) for name, tc in branches.items()}
        wait_showing_progress(futures, configs)
        return {name: f.result() for name, f in futures.items()}


PROGRESS_EVERY = 600.0  # seconds between progress lines while runs train side by side


def wait_showing_progress(
    futures: dict[str, Future],
    configs: dict[str, TrainConfig],
    until: Future | None = None,
    every: float | None = None,
) -> None:
    """Wait for `until` (else for every run), printing where each unfinished run stands every
    `every` seconds: side by side the runs draw no progress bars, and a pair on 60M tokens
    trains for hours."""
    every = PROGRESS_EVERY if every is None else every
    while wait([until] if until else list(futures.values()), timeout=every).not_done:
        lines = [run_progress(n, Path(configs[n].out)) for n, f in futures.items() if not f.done()]
        print(f"[{time.strftime('%H:%M')}] " + " | ".join(lines), flush=True)


def run_progress(name: str, run: Path, window: float = 300.0) -> str:
    """One run's place, read from its directory: tokens of its budget, its last validation
    loss, its speed over the last `window` training seconds and the time left at that speed."""
    recs = read_metrics(run / "metrics.jsonl")
    steps = [r for r in recs if "tok_per_s" in r]
    if not steps:  # queued for a free core, or loading before its first step
        return f"{name}: waiting to start"
    last = steps[-1]
    since = next(r for r in steps if r["train_seconds"] >= last["train_seconds"] - window)
    seconds = last["train_seconds"] - since["train_seconds"]
    rate = (last["tokens"] - since["tokens"]) / seconds if seconds > 0 else last["tok_per_s"]
    budget = json.loads((run / "train_config.json").read_text()).get("tokens")
    line = f"{name}: {human(last['tokens'])}"
    if budget:
        line += f" of {human(budget)} tokens ({last['tokens'] / budget:.0%})"
    vals = [r for r in recs if "val_loss" in r]
    if vals:
        line += f", val {vals[-1]['val_loss']:.4f} at {human(vals[-1]['tokens'])}"
    line += f", {rate:,.0f} tokens/s"
    if budget and rate > 0:
        line += ", " + time_left(max(budget - last["tokens"], 0) / rate)
    return line


def time_left(seconds: float) -> str:
    if seconds >= 3600:
        return f"~{seconds / 3600:.1f} h left"
    return f"~{seconds / 60:.0f} min left" if seconds >= 60 else "under a minute left"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tokens", type=float, default=8e5, help="training tokens per model")
    ap.add_argument(
        "--data", default="data/stdlib-8k", help="shard dir (built from stdlib if absent)"
    )
    ap.add_argument("--out", default="runs/moe_vs_dense")
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--png", default=None, help="the plot (default: OUT/moe_vs_dense.png)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="train both under torch.compile")
    ap.add_argument(
        "--dtype", default="auto", help="auto (bf16 where the CPU has it), bf16 or fp32"
    )
    ap.add_argument(
        "--sequential",
        action="store_true",
        help="train one model after the other on all cores (default: side by side, half each)",
    )
    ap.add_argument(
        "--moe-lr",
        type=float,
        default=None,
        help="the MoE's peak learning rate (default: the training default, as the dense's)",
    )
    ap.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of both models' configs, e.g. hidden_size=384 (repeatable)",
    )
    ap.add_argument(
        "--moe",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the MoE's model config (repeatable)",
    )
    ap.add_argument(
        "--train",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a training setting of both models, e.g. batch_size=16 (repeatable)",
    )
    ap.add_argument(
        "--moe-train",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a training setting of the MoE alone (repeatable; after --train)",
    )
    ap.add_argument(
        "--recipe",
        action="append",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE...]",
        help="a candidate training recipe for both models (repeatable): each model is then "
        "compared at the one that suits it best",
    )
    ap.add_argument(
        "--moe-budget",
        type=float,
        default=1.0,
        metavar="FRACTION",
        help="the MoE's token budget as a fraction of the dense model's (default 1: the same)",
    )
    ap.add_argument(
        "--branches",
        type=parse_fractions,
        default=[],
        metavar="F[,F...]",
        help="also decay the MoE at these fractions of the budget, branched from its run "
        "(its kept checkpoints), and find the budget where its decayed loss meets the dense "
        "final loss (needs --moe-train gamma_tokens=N)",
    )
    ap.add_argument(
        "--report",
        action="store_true",
        help="train nothing: print and plot the runs already in --out (give the flags they "
        "were trained with)",
    )
    ap.add_argument(
        "--against",
        default=None,
        metavar="OUT",
        help="set the runs beside another finished run of this benchmark (its --out; the "
        "same flags but --seed): losses and leads at the same tokens, both multipliers",
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="go on with the runs in --out where they stopped (each from its last checkpoint; "
        "give the flags they were started with); runs never started start afresh",
    )
    args = ap.parse_args(argv)
    if args.png is None:
        args.png = str(Path(args.out) / "moe_vs_dense.png")
    if args.resume and args.report:
        raise SystemExit("--report reads finished runs; --resume trains: not both")
    if not 0 < args.moe_budget <= 1:
        raise SystemExit(f"--moe-budget must be in (0, 1], got {args.moe_budget}")
    if args.branches and len(args.recipe) > 1:
        raise SystemExit("--branches decays one MoE run: not with several --recipe")
    if args.branches and max(args.branches) >= args.moe_budget:
        raise SystemExit(
            f"--branches {max(args.branches):g}: each budget must be below the MoE run's "
            f"(--moe-budget {args.moe_budget:g}), which it is decayed from"
        )
    return args


def parse_fractions(text: str) -> list[float]:
    """'0.6,0.7' -> [0.6, 0.7], each in (0, 1), sorted."""
    try:
        fs = sorted(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"fractions like 0.6,0.7, got {text!r}") from None
    if not fs or not all(0 < f < 1 for f in fs):
        raise argparse.ArgumentTypeError(f"fractions in (0, 1), got {text!r}")
    return fs


class Trial(NamedTuple):
    """One recipe's training of both models: their configs and run summaries, by preset."""

    recipe: dict[str, Any]
    configs: dict[str, TrainConfig]
    summaries: dict[str, dict]


def print_recipes(trials: list[Trial], best: dict[str, int]) -> None:
    """The table of every recipe's losses and speeds, and which model each one suits."""
    rows = [
        (
            str(i + 1),
            recipe_name(t.recipe),
            f"{t.summaries['small']['final_val_loss']:.4f}",
            f"{t.summaries['small']['tokens_per_second']:,.0f}",
            f"{t.summaries['dense-small']['final_val_loss']:.4f}",
            f"{t.summaries['dense-small']['tokens_per_second']:,.0f}",
            " and ".join(n for p, n in ROLE.items() if best[p] == i),
        )
        for i, t in enumerate(trials)
    ]
    head = ("", "recipe", "MoE loss", "MoE tok/s", "dense loss", "dense tok/s", "best for")
    print("\neach recipe (each model compared below at its best):")
    print(format_table(rows, header=head))
    for preset, name in ROLE.items():
        print(f"{name}: recipe {best[preset] + 1} ({recipe_name(trials[best[preset]].recipe)})")


def print_models(summaries: dict[str, dict], models: dict[str, dict[str, Any]]) -> float:
    """The two models' table (size, speed, compute, loss) -> the MoE/dense tokens/s ratio."""
    table = []
    for preset in ("small", "dense-small"):
        cfg = dataclasses.replace(get_preset(preset), **models[preset])
        s, pc = summaries[preset], param_counts(cfg)
        table.append(
            (
                preset,
                human(pc["total"]),
                human(pc["activated"]),
                human(s["flops_per_token"]),
                f"{s['tokens_per_second']:,.0f}",
                f"{s['wall_seconds']:.0f}",
                f"{s['total_flops']:.3g}",
                f"{s['final_val_loss']:.4f}",
                f"{s['final_val_bpb']:.3f}",
            )
        )
    header = ("", "params", "active", "FLOPs/tok", "tokens/s", "train s", "FLOPs", "val loss")
    print(format_table(table, header=(*header, "bits/byte")))
    ratio = summaries["small"]["tokens_per_second"] / summaries["dense-small"]["tokens_per_second"]
    print(f"MoE tokens/s = {ratio:.2f}x the dense model's")
    return ratio


def stable_tokens(configs: dict[str, TrainConfig]) -> dict[str, float | None]:
    """Where each run's LR starts to fall (by preset): wsd's decay; cosine has no stable
    phase (None)."""
    return {
        p: tc.tokens * (1 - tc.decay_frac) if tc.schedule == "wsd" and tc.tokens else None
        for p, tc in configs.items()
    }


def print_comparison(
    configs: dict[str, TrainConfig],
    runs: dict[str, dict[str, np.ndarray]],
    ratio: float,
    side_by_side: bool,
) -> None:
    """The MoE against the dense model over the run: speed while both trained, expert load,
    lead, compute multiplier before the decay, and where it reaches the dense final loss."""
    moe, dense = runs["small"], runs["dense-small"]
    recs = {p: read_metrics(Path(tc.out) / "metrics.jsonl") for p, tc in configs.items()}
    if side_by_side:  # the faster run ends first; the other then has the machine to itself
        end = min(r[-1]["elapsed"] for r in recs.values())
        rates = {p: rate_until(r, end) for p, r in recs.items()}
        print(
            f"while both trained (the first {end:.0f} s): MoE {rates['small']:,.0f} tokens/s, "
            f"dense {rates['dense-small']:,.0f}: {rates['small'] / rates['dense-small']:.2f}x"
        )
    load = expert_load(recs["small"])
    if load is not None:
        worst, at, late = load
        print(
            f"the MoE's expert load (max/mean tokens per expert, layers averaged; 1 is even): "
            f"{worst:.2f} at worst in the first 10% of the steps (step {at}), {late:.2f} over "
            f"the last 10%"
        )
    quarters = [0.25, 0.5, 0.75, 1.0]
    leads = " / ".join("-" if x is None else f"{x:+.3f}" for x in lead_at(moe, dense, quarters))
    print(f"the MoE's lead (dense - MoE validation loss) at 25/50/75/100% of the tokens: {leads}")
    stable = stable_tokens(configs)
    if stable["small"] and stable["dense-small"]:
        found = token_multiplier(moe, dense, stable["small"], stable["dense-small"])
        if found is not None:
            mult, n = found
            print(
                f"before the decay the dense model needs {mult:.2f}x the MoE's tokens for the "
                f"same validation loss (median of {n} points); with the tokens/s above, the "
                f"MoE gets there in {1 / (mult * ratio):.0%} of the dense wall time"
            )
    target = dense["val"][-1]
    f_reach, t_reach = first_reach(moe, target, "flops"), first_reach(moe, target, "seconds")
    if f_reach is None:
        print(
            f"the MoE did not reach the dense model's final validation loss ({target:.4f}) "
            f"within the budget: the claim does not hold at this scale and budget"
        )
    else:
        print(
            f"the MoE reached the dense model's final validation loss ({target:.4f}) at "
            f"{f_reach / dense['flops'][-1]:.0%} of the dense training FLOPs and "
            f"{t_reach / dense['seconds'][-1]:.0%} of its training time"
        )


def print_beside_seed(
    runs: dict[str, dict[str, np.ndarray]], configs: dict[str, TrainConfig], against: Path
) -> None:
    """--against: this pair beside another finished pair of the same benchmark (another
    seed), at every tenth of the dense tokens, and each pair's multiplier before the decay
    (both read at this benchmark's schedules: give the same flags but --seed and --out)."""
    missing = [p for p in ROLE if not (against / p / "summary.json").exists()]
    if missing:
        raise SystemExit(
            f"--against: no finished run in {', '.join(str(against / p) for p in missing)}"
        )
    other = {p: curve(against / p) for p in ROLE}

    def shown(i: int, x: float | None) -> str:  # a loss, or a lead (every third column)
        return "" if x is None else f"{x:+.4f}" if i % 3 == 2 else f"{x:.4f}"

    tenths = [i / 10 for i in range(1, 11)]
    rows = [
        (human(t), *(shown(i, x) for i, x in enumerate(row)))
        for t, row in beside_seed(runs, other, tenths)
    ]
    head = ("tokens", "MoE", "dense", "lead", "MoE (against)", "dense (against)", "lead (against)")
    print(f"\nbeside {against} (lead: dense - MoE validation loss at the same tokens):")
    print(format_table(rows, header=head))
    stable = stable_tokens(configs)
    if stable["small"] and stable["dense-small"]:
        found = [
            token_multiplier(
                pair["small"], pair["dense-small"], stable["small"], stable["dense-small"]
            )
            for pair in (runs, other)
        ]
        if all(found):
            (m, n), (m_other, n_other) = found
            print(
                f"before the decay the dense model needs {m:.2f}x the MoE's tokens here "
                f"({n} points), {m_other:.2f}x in {against} ({n_other} points)"
            )


def continued(tc: TrainConfig) -> TrainConfig:
    """--resume: a run that left a checkpoint goes on from it (a finished one is only read
    back); one that never saved starts afresh."""
    if find_checkpoint(Path(tc.out) / "ckpt") is None:
        return tc
    print(f"resuming {tc.out}", flush=True)  # a branch goes on; it does not branch again
    return dataclasses.replace(tc, resume=True, overwrite=False, decay_from=None)


def branch_configs(
    trunk: TrainConfig,
    fractions: list[float],
    budget: float,
    side_by_side: bool,
    resume: bool = False,
) -> dict[str, TrainConfig]:
    """The MoE's decay branches (its run `trunk` kept its checkpoints), by run directory
    name: one for each fraction of the dense model's token `budget`, from the kept checkpoint
    of the trunk's stable phase nearest where that budget's decay starts. The kept checkpoints
    not branched from are removed (each holds the weights and AdamW moments); `resume`: a
    branch that left a checkpoint goes on from it."""
    out, start = Path(trunk.out), 1 - trunk.decay_frac
    kept = {p: read_train_state(p).tokens for p in sorted(out.glob("ckpt-*"))}
    stable = {p: t for p, t in kept.items() if t <= start * trunk.tokens}  # a branch starts there
    if not stable:
        raise SystemExit(f"--branches: {out} kept no checkpoints (a shorter --eval-every?)")
    picks = sorted({nearest_kept(stable, start * f * budget) for f in fractions})
    for p in kept.keys() - set(picks):
        shutil.rmtree(p)
    print(f"decaying the MoE from {len(picks)} of its checkpoints", flush=True)
    branches = {
        f"small-decay-{p.name[5:]}": make_config(
            decay_from=str(p),
            out=str(out.with_name(f"small-decay-{p.name[5:]}")),
            threads=trunk.threads,
            progress=not side_by_side,
            overwrite=True,
        )
        for p in picks
    }
    return {name: continued(tc) for name, tc in branches.items()} if resume else branches


def read_runs(configs: dict[str, TrainConfig]) -> dict[str, dict]:
    """--report: the summaries of the runs trained before (by preset) and of the MoE's decay
    branches beside them (by directory name), as training them returned them."""
    missing = [tc.out for tc in configs.values() if not (Path(tc.out) / "summary.json").exists()]
    if missing:
        raise SystemExit(f"--report: no finished run in {', '.join(missing)}")
    runs = {p: Path(tc.out) for p, tc in configs.items()}
    runs |= {d.name: d for d in Path(configs["small"].out).parent.glob("small-decay-*")}
    return {
        name: json.loads((d / "summary.json").read_text())
        for name, d in runs.items()
        if (d / "summary.json").exists()
    }


def print_branches(
    branches: dict[Path, dict], moe: dict, dense: dict, budget: float, side_by_side: bool
) -> None:
    """Each decayed MoE budget (the branches and the full run) against the dense model's
    final loss and training time, and where the MoE's decayed loss meets the dense one."""
    points = sorted(
        (s["tokens_seen"], s["wall_seconds"], s["final_val_loss"])
        for s in [*branches.values(), moe]
    )
    dense_s, target = dense["wall_seconds"], dense["final_val_loss"]
    rows = [
        (
            human(t),
            f"{t / budget:.0%}",
            f"{v:.4f}",
            f"{v - target:+.4f}",
            f"{sec:.0f}",
            f"{sec / dense_s:.0%}",
        )
        for t, sec, v in points
    ]
    head = ("MoE budget", "of dense tokens", "val loss", "- dense", "train s", "of dense s")
    print("\nthe MoE decayed at each budget (branches of its run) against the dense final loss:")
    print(format_table(rows, header=head))
    found = iso_budget(points, target)
    if not isinstance(found, str):
        t, sec = found
        how = "; the decays ran two at a time, the full runs side by side" if side_by_side else ""
        print(
            f"the MoE's decayed loss meets the dense final loss ({target:.4f}) at a budget of "
            f"{human(t)} tokens: {t / budget:.0%} of the dense tokens, trained in "
            f"{sec / dense_s:.0%} of the dense training time (interpolated between budgets{how})"
        )
        return
    if found == "below":
        t, sec, _ = points[0]
        print(
            f"the MoE's smallest budget ({t / budget:.0%} of the dense tokens, {sec / dense_s:.0%} "
            f"of its training time) already ends at or below the dense final loss ({target:.4f})"
        )
    else:
        print(f"no MoE budget up to the full one reaches the dense final loss ({target:.4f})")
    if guess := extrapolate_budget(points, target):
        t, sec, slope = guess
        ends = "largest" if found == "above" else "smallest"
        print(
            f"extrapolated from its two {ends} budgets ({slope:.3f} nats a doubling of the "
            f"tokens): it would meet it at ~{human(t)} tokens, ~{t / budget:.0%} of the dense "
            f"tokens, in ~{sec / dense_s:.0%} of the dense training time (an estimate, not a run)"
        )


def plot(
    runs: dict[str, dict[str, np.ndarray]],
    title: str,
    png: str,
    branches: dict[str, dict[str, np.ndarray]] | None = None,
) -> None:
    """Validation loss against training FLOPs and against wall time, the dense final loss
    drawn across both; the MoE's decay branches (by label) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = runs["dense-small"]["val"][-1]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for preset, c in runs.items():
        label = f"{preset} ({ROLE[preset]})"
        axes[0].plot(c["flops"], c["val"], "o-", ms=3, label=label)
        axes[1].plot(c["seconds"], c["val"], "o-", ms=3, label=label)
    for label, c in (branches or {}).items():
        tail = c["tokens"] >= c["tokens"][-1] * 0.7  # its decay and a little before
        axes[0].plot(c["flops"][tail], c["val"][tail], "--", lw=1, label=label)
        axes[1].plot(c["seconds"][tail], c["val"][tail], "--", lw=1, label=label)
    for ax, xl in zip(axes, ("training FLOPs", "training wall time (s)"), strict=True):
        ax.axhline(target, color="gray", lw=0.8, ls="--")
        ax.set_xlabel(xl)
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(textwrap.fill(title, 130), fontsize=10)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"plot: {png}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    shape = dict(parse_override(item) for item in args.model)
    moe_model = dict(parse_override(item) for item in args.moe)
    models = model_overrides(shape, moe_model)
    both, moe_only = train_overrides(args.train, args.moe_train, args.moe_lr)
    if args.branches:
        moe_settings = {**both, **moe_only}
        if not moe_settings.get("gamma_tokens"):
            raise SystemExit(
                "--branches: fix the MoE's bias speed in tokens (--moe-train gamma_tokens=N), "
                "so its run's stable phase is that of every shorter budget"
            )
        if moe_settings.get("schedule", "wsd") != "wsd":
            raise SystemExit("--branches decays a wsd run; not with schedule=cosine")
    cores = os.cpu_count() or 1
    device = resolve_device(str(both.get("device", "auto")))
    side_by_side = runs_side_by_side(args.sequential, cores, device)
    threads = cores // 2 if side_by_side else None

    shards = (
        prepare("stdlib", args.data)
        if not (Path(args.data) / "meta.json").exists()
        else Path(args.data)
    )
    recipes = [parse_recipe(r) for r in args.recipe] or [{}]

    def configs_for(recipe: dict[str, Any], out: Path) -> dict[str, TrainConfig]:
        return {
            preset: make_config(
                preset=preset,
                data=str(shards),
                out=str(out / preset),
                tokens=args.tokens * (args.moe_budget if preset == "small" else 1.0),
                eval_every=args.eval_every,
                overwrite=True,
                seed=args.seed,
                compile=args.compile,
                dtype=args.dtype,
                threads=threads,
                progress=not side_by_side,  # two bars on one terminal garble each other
                model=models[preset] or None,
                keep_every=args.eval_every if args.branches and preset == "small" else None,
                **{**both, **recipe, **(moe_only if preset == "small" else {})},
            )
            for preset in ("small", "dense-small")
        }

    how = f"side by side, {threads} thread(s) each" if side_by_side else "one after the other"
    trials, decayed = [], {}
    for i, recipe in enumerate(recipes):
        out = Path(args.out) / f"recipe{i}" if len(recipes) > 1 else Path(args.out)
        configs = configs_for(recipe, out)
        which = f" (recipe {i + 1} of {len(recipes)}: {recipe_name(recipe)})" if recipe else ""
        if args.report:
            print(f"reading the runs in {out}{which}", flush=True)
            done = read_runs(configs)
        else:
            print(
                f"training small and dense-small on {human(args.tokens)} tokens, {how}{which}",
                flush=True,
            )
            if args.resume:
                configs = {preset: continued(tc) for preset, tc in configs.items()}
            then = None  # the MoE's decay branches, once its run has ended
            if args.branches:
                trunk = configs["small"]
                then = functools.partial(
                    branch_configs, trunk, args.branches, args.tokens, side_by_side, args.resume
                )
            done = run_both(configs, side_by_side, then)
        trials.append(Trial(recipe, configs, {p: done.pop(p) for p in configs}))
        decayed = {out / name: summary for name, summary in done.items()}  # its branches
    best = {preset: best_of([t.summaries for t in trials], preset) for preset in ROLE}
    if len(trials) > 1:  # each model is judged at the recipe that suits it best
        print_recipes(trials, best)
    configs = {p: trials[i].configs[p] for p, i in best.items()}
    summaries = {p: trials[i].summaries[p] for p, i in best.items()}
    runs = {preset: curve(Path(tc.out)) for preset, tc in configs.items()}

    print(
        f"\nMoE vs dense, same data and {human(args.tokens)}-token budget "
        f"({summaries['small']['dtype']}, {summaries['small']['device']}, {how})"
    )
    if args.moe_budget != 1:
        print(
            f"MoE budget: {args.moe_budget:g} x the dense model's "
            f"({human(args.tokens * args.moe_budget)} tokens, its schedules set for them)"
        )
    if shape:
        print(f"both models' overrides: {shape}")
    if moe_model:
        print(f"MoE model overrides: {moe_model}")
    if both:
        print(f"training overrides (both models): {both}")
    for key in moe_only:
        print(
            f"MoE {key} {getattr(configs['small'], key)!r}, "
            f"dense {getattr(configs['dense-small'], key)!r}"
        )
    ratio = print_models(summaries, models)
    # "while both trained" is one pair's: only where both bests come from one recipe
    one_pair = side_by_side and best["small"] == best["dense-small"]
    print_comparison(configs, runs, ratio, one_pair)
    branches = {}
    if args.branches:
        print_branches(
            decayed, summaries["small"], summaries["dense-small"], args.tokens, side_by_side
        )
        branches = {
            f"MoE decayed at {human(s['tokens_seen'])}": curve(d) for d, s in decayed.items()
        }

    if args.against:
        print_beside_seed(runs, configs, Path(args.against))

    budget = {"budget": f"{args.moe_budget:g}x"} if args.moe_budget != 1 else {}
    recipe = ", ".join(f"{k}={v}" for k, v in {**moe_model, **moe_only, **budget}.items())
    recipe = f"MoE with {recipe}" if recipe else "same activated parameters"
    if len(trials) > 1:
        recipe += "; each at its best recipe: " + "; ".join(
            f"{n} {recipe_name(trials[best[p]].recipe)}" for p, n in ROLE.items()
        )
    at = " at " + ", ".join(f"{k}={v}" for k, v in shape.items()) if shape else ""
    corpus = "the stdlib corpus" if Path(args.data).name == "stdlib-8k" else Path(args.data).name
    title = f"MoE vs dense{at} ({recipe}), {human(args.tokens)} tokens of {corpus}"
    plot(runs, title, args.png, branches)


if __name__ == "__main__":
    preload_tcmalloc()  # as `nanoseek train` does: both trainings inherit it
    main()
