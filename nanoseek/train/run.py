"""The pieces a training loop is made of, besides its step: the run directory (new, resumed or
overwritten), the optimizer, evaluation and the guard against non-finite steps. Pretraining
uses them; SFT and GRPO loops are meant to call the same ones.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nanoseek.model.loss import kernel_builds as loss_kernel_builds
from nanoseek.model.moe import expert_kernel_builds
from nanoseek.train.checkpoint import RunState, find_checkpoint, read_train_state
from nanoseek.train.config import (
    OPTIMIZER_STATES,
    Config,
    RunConfig,
    TrainError,
    resume_config,
)
from nanoseek.train.runtime import Runtime

OPTIMIZERS = ("adamw", "muon")


def open_run(tc: Config) -> tuple[Config, Path | None]:
    """Check OUT against --resume / --overwrite. -> (the settings to run with, the checkpoint
    to continue from or None). On --resume the settings are the run's saved ones, updated
    with what was given now where that may change (see `resume_config`)."""
    ckpt_dir = Path(tc.out) / "ckpt"
    found = find_checkpoint(ckpt_dir)
    if found and not (tc.resume or tc.overwrite):
        raise TrainError(
            f"{tc.out} already holds a checkpoint; pass --resume to continue it or "
            "--overwrite to start afresh"
        )
    if not tc.resume:
        return tc, None
    if not found:
        raise TrainError(f"--resume: no checkpoint in {ckpt_dir}")
    return resume_config(tc, read_train_state(found).train_config), found


def check_resume(
    state: RunState, tc: RunConfig, tokenizer_hash: str, data: Path, warn: bool
) -> None:
    """A resumed run goes on with the tokenizer it was trained with; a changed budget that
    did not become its LR horizon moves where it stops, not its LR schedule (said once, by
    rank 0: `warn`)."""
    if state.tokenizer != tokenizer_hash:
        raise TrainError(
            f"{tc.out}/ckpt was trained with tokenizer {state.tokenizer}, but the shards in "
            f"{data} use {tokenizer_hash}"
        )
    if warn and state.lr_horizon != tc.budget():
        warnings.warn(
            f"--resume: the budget changed ({state.lr_horizon.describe()} -> "
            f"{tc.budget().describe()}); the run stops at the new one, but the LR schedule "
            "keeps its original horizon so the LR does not jump (past it, the LR stays at its "
            "final value). To plan a new schedule, start a fresh run (--overwrite)",
            stacklevel=3,
        )


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    kind: str = "adamw",
    router_lr: float = 1.0,
    states: str = "fp32",
    expert_beta2: float | None = None,
    expert_lr: float = 1.0,
    expert_weight_decay: float | None = None,
) -> torch.optim.Optimizer:
    """AdamW (`kind` "adamw"), or Muon for the blocks' weight matrices and AdamW for the rest
    ("muon", train/muon.py). Weight decay on matrices only, not on norms (nor biases). The
    MoE routers' weights train at `router_lr` x the learning rate (their group's `lr_scale`,
    applied by set_lr). Under FSDP2 / EP the parameters sharded alike share a group (one
    fused kernel cannot mix whole and sharded tensors, or two meshes). `states` "bf16" keeps
    AdamW's moments in bf16 (DeepSeek-V3's recipe, train/adamw.py); "fp32" is torch's fused
    AdamW. `expert_beta2`: the routed experts' AdamW beta2, `expert_lr`: their learning rate as
    a fraction of the rest's, and `expert_weight_decay` their weight decay (a group of their
    own where any differs)."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {kind!r}; use one of {', '.join(OPTIMIZERS)}")
    if states not in OPTIMIZER_STATES:
        raise ValueError(
            f"unknown optimizer state dtype {states!r}; use one of {', '.join(OPTIMIZER_STATES)}"
        )
    if states != "fp32" and kind != "adamw":
        raise ValueError(f"{states} optimizer states are for adamw, not {kind}")
    muon = set()
    if kind == "muon":
        from nanoseek.train.muon import muon_parameters

        muon = {id(p) for p in muon_parameters(model)[0]}
    own_beta2 = expert_beta2 is not None and expert_beta2 != betas[1]
    own_wd = expert_weight_decay is not None and expert_weight_decay != weight_decay

    def own_settings(name: str, p: nn.Parameter) -> tuple[tuple[str, Any], ...]:
        """The settings a parameter's group holds apart from the optimizer's defaults."""
        if router_lr != 1.0 and is_router(name):
            return (("lr_scale", router_lr),)
        if not is_routed_expert(name):
            return ()
        lr_scale = (("lr_scale", expert_lr),) if expert_lr != 1.0 else ()
        beta2 = (("betas", (betas[0], expert_beta2)),) if own_beta2 and id(p) not in muon else ()
        # matrices only, as the shared decay: a 1-D expert weight would keep no decay
        wd = (("weight_decay", expert_weight_decay),) if own_wd and p.dim() >= 2 else ()
        return lr_scale + beta2 + wd

    groups: dict[tuple[bool, bool, tuple, int], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        mesh = id(getattr(p, "device_mesh", None))
        key = (id(p) in muon, p.dim() >= 2, own_settings(name, p), mesh)
        groups.setdefault(key, []).append(p)
    param_groups = [
        {"params": params, "weight_decay": weight_decay if decay else 0.0}
        | ({"muon": True} if is_muon else {})
        | dict(own)
        for (is_muon, decay, own, _), params in sorted(groups.items(), key=lambda kv: not kv[0][1])
    ]
    if kind == "muon":
        from nanoseek.train.muon import MuonAdamW

        return MuonAdamW(param_groups, lr=lr, betas=betas, eps=1e-8)
    if states == "bf16":
        from nanoseek.train.adamw import BF16AdamW

        return BF16AdamW(param_groups, lr=lr, betas=betas, eps=1e-8)
    # fused: one kernel over all parameters (CPU and CUDA), ~2x the default on this model
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=1e-8, fused=True)


def build_kernels(rt: Runtime) -> None:
    """On CPU, build (on a machine's first run: ~10-20 s each) and load the training kernels
    (the experts' loop, the loss's softmax) before a run's clock starts, so that a minutes
    budget and the tokens/s figures do not pay for the compile. Where one cannot build, the
    warning comes now and the run uses torch ops."""
    if rt.device.type == "cpu":
        expert_kernel_builds()
        loss_kernel_builds()


def is_router(name: str) -> bool:
    """An MoE router's weight (V3's `gate`, V4's routers), by parameter name."""
    return ".gate." in name and name.endswith("weight")


def is_routed_expert(name: str) -> bool:
    """A routed expert's weight (V3's stacked `experts.w13` / `w2`, V4's), by parameter name:
    not the shared experts, not the router."""
    return ".experts." in name


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Every group to `lr` (times its `lr_scale`, the routers'); -> lr."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], rt: Runtime
) -> float:
    """Mean next-token loss (nats) over `batches` and over all ranks; MTP off."""
    was_training = model.training
    model.eval()
    losses = []
    for x, y in batches:
        with rt.autocast():
            out = model(x.to(rt.device), targets=y.to(rt.device), mtp_weight=0)
        losses.append(out.main_loss.item())
    model.train(was_training)
    return rt.all_reduce_mean(sum(losses) / len(losses))


class StepGuard:
    """Decides whether a step is applied: not if its loss or gradient norm is non-finite
    (a warning, and no update); `max_bad` such steps in a row stop the run with an error
    that names the last good checkpoint."""

    def __init__(self, max_bad: int, ckpt_dir: Path, warn: bool = True):
        self.max_bad = max_bad
        self.ckpt_dir = Path(ckpt_dir)
        self.warn = warn
        self.bad = 0  # non-finite steps in a row, up to the last one checked

    def ok(self, step: int, loss: float, grad_norm: float) -> bool:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.bad = 0
            return True
        self.bad += 1
        if self.warn:
            warnings.warn(
                f"step {step}: non-finite loss ({loss}) or gradient norm ({grad_norm}); "
                "step skipped",
                stacklevel=2,
            )
        if self.bad >= self.max_bad:
            last = find_checkpoint(self.ckpt_dir)
            raise TrainError(
                f"loss was non-finite for {self.bad} steps in a row (up to step {step}); run "
                f"stopped. Last good checkpoint: {last or 'none'}. Try --grad-clip 1 or "
                "--dtype fp32 (with --resume), or a lower --lr (a fresh run: --overwrite)"
            )
        return False


def apply_update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    guard: StepGuard,
    rt: Runtime,
    step: int,
    loss: float,
    grad_clip: float,
) -> tuple[float, bool]:
    """The end of every training step (pretrain, SFT, GRPO): clip the gradients (0: off),
    step the optimizer unless the guard rejects a non-finite loss or norm, clear the
    gradients. -> (gradient norm, whether the step was taken)."""
    norm = rt.clip_grads(model, grad_clip if grad_clip > 0 else math.inf, optimizer)
    taken = guard.ok(step, loss, norm)
    if taken:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, taken


def tick(state: RunState, t0: float, t_start: float, rt: Runtime, *budgets: Any) -> float:
    """A step's seconds (since t0) into the run's clocks; the elapsed time broadcast from
    rank 0 when a budget counts minutes, so every rank stops at the same step. -> seconds."""
    dt = time.perf_counter() - t0
    state.train_seconds += dt
    state.elapsed = time.perf_counter() - t_start
    if any(b.minutes for b in budgets):
        state.elapsed = rt.broadcast(state.elapsed)
    return dt


def end_of_step(
    state: RunState,
    stop: Any,
    rec: dict[str, Any],
    progress: Any,
    guard: StepGuard,
    every: tuple[int, int],
    evaluate: Callable[[], dict[str, Any]] | None,
    save: Callable[[], None],
) -> None:
    """How every loop (pretrain, SFT, GRPO) ends a step: evaluate when due and at the end
    (`evaluate` returns the record's new fields; None: nothing to evaluate), log the record
    to `progress`, and checkpoint when due (not while steps are being skipped as
    non-finite) and at the end. every = (eval_every, save_every), 0 = only at the end."""
    eval_every, save_every = every
    done = state.progress(stop) >= 1.0
    if evaluate is not None and ((eval_every and state.step % eval_every == 0) or done):
        rec.update(evaluate())
    progress.update(rec, state.progress(stop), last=done)
    if (save_every and state.step % save_every == 0 and guard.bad == 0) or done:
        save()
