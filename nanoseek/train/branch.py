"""Decay branches of a wsd run: one run at its peak LR, decayed from its kept checkpoints.

Under `wsd` the LR stays at its peak until the last `decay_frac` of the budget, so the stable
part of a run does not depend on the budget (with the bias speed fixed in tokens,
`--gamma-tokens`). A run that keeps checkpoints along the way (`--keep-every N`:
OUT/ckpt-<step>) can therefore be finished at several budgets afterwards: each branch
(`--decay-from OUT/ckpt-<step> --out BRANCH`) goes on from the checkpoint as the run whose
decay starts there would have (budget = the checkpoint's steps or tokens / (1 - decay_frac)),
so each budget costs only its decay. This is how the decayed loss is compared across budgets
(MiniCPM's WSD): a model's loss for B tokens is a decayed one, which a run at its peak LR
does not show.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from nanoseek.train.budget import Budget
from nanoseek.train.checkpoint import RunState, find_checkpoint, read_train_state
from nanoseek.train.config import BUDGET, TrainConfig, TrainError, resume_config
from nanoseek.train.metrics import copy_metrics
from nanoseek.utils import atomic_dir

KEPT = "ckpt-{step:07d}"  # a kept checkpoint's directory name in OUT
BRANCH_MAY_CHANGE = ("decay_frac", "decay_shape", "gamma_decay")  # the decay's, not the trunk's


def keep_checkpoint(ckpt_dir: Path, step: int) -> Path:
    """Copy the checkpoint just written to OUT/ckpt-<step> (whole, or not at all)."""
    kept = ckpt_dir.with_name(KEPT.format(step=step))
    with atomic_dir(kept) as tmp:
        shutil.copytree(ckpt_dir, tmp, dirs_exist_ok=True)
    return kept


def branch_horizon(state: RunState, decay_frac: float) -> Budget:
    """The budget whose wsd decay starts where `state` stands: each measure the run's own
    horizon is given in (steps, tokens, minutes) scaled by 1 / (1 - decay_frac)."""
    scale = 1.0 / (1.0 - decay_frac)
    h = state.lr_horizon
    return Budget(
        steps=round(state.step * scale) if h.steps else None,
        tokens=state.tokens * scale if h.tokens else None,
        minutes=state.elapsed / 60 * scale if h.minutes else None,
    )


def at_peak_lr(state: RunState, horizon: Budget, decay_frac: float) -> bool:
    """Whether `state` is still in the stable phase of a wsd run over `horizon` (a checkpoint
    exactly where the decay starts counts, whatever the float rounding)."""
    return state.progress(horizon) <= 1.0 - decay_frac + 1e-9


def open_branch(tc: TrainConfig) -> tuple[TrainConfig, Path]:
    """-> (the branch's settings: the trunk's, with --decay-frac, --decay-shape and
    --gamma-decay if given, the budget that decays from the checkpoint, and this launch's
    machine settings; the checkpoint). The trunk's metrics up to the checkpoint are copied
    into the branch's, so it reads as one run."""
    found = find_checkpoint(tc.decay_from)
    if found is None:
        raise TrainError(f"--decay-from: no checkpoint in {tc.decay_from}")
    out = Path(tc.out)
    if out.resolve() == found.parent.resolve():
        raise TrainError("--decay-from: give the branch its own --out, not the trunk's")
    if find_checkpoint(out / "ckpt") and not tc.overwrite:
        raise TrainError(
            f"{tc.out} already holds a checkpoint; pass --overwrite to branch afresh, or "
            "--resume (without --decay-from) to continue that branch"
        )
    state = read_train_state(found)
    saved = state.train_config
    given = tc.given_fields()
    if given & set(BUDGET):
        raise TrainError(
            "--decay-from: a branch's budget follows from its checkpoint and --decay-frac "
            "(it decays from there as a run of that budget would); drop --steps/--tokens/--minutes"
        )
    if saved.get("schedule") != "wsd":
        raise TrainError(
            f"--decay-from branches a wsd run (its LR at the peak until the decay); {found} "
            f"was trained with {saved.get('schedule')!r}"
        )
    if not at_peak_lr(state, state.lr_horizon, saved["decay_frac"]):
        raise TrainError(
            f"--decay-from: {found} is {state.progress(state.lr_horizon):.0%} through its run's "
            f"LR horizon, past where its decay began ({1.0 - saved['decay_frac']:.0%}); branch "
            "from a checkpoint of the stable phase"
        )
    decay = {k: getattr(tc, k) for k in BRANCH_MAY_CHANGE if k in given}  # else the trunk's
    horizon = branch_horizon(state, decay.get("decay_frac", saved["decay_frac"]))
    trunk = dataclasses.replace(tc, decay_from=None, overwrite=False)
    trunk.given = frozenset(given - {"decay_from", "overwrite", *BRANCH_MAY_CHANGE})
    # a branch's own checkpoints are in its decay, where no branch may start: none kept
    keep = tc.keep_every if "keep_every" in given else 0
    merged = resume_config(
        trunk,
        {**saved, **decay, "keep_every": keep, **horizon.to_dict()},
        "--decay-from",
    )
    branch = dataclasses.replace(
        merged, resume=False, decay_from=str(found), overwrite=tc.overwrite
    )
    branch.validate()
    copy_metrics(found.parent / "metrics.jsonl", out / "metrics.jsonl", state.step)
    return branch, found
