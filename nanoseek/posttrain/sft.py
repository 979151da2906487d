"""Supervised fine-tuning: the pretraining loop's sibling, on chats instead of shards.

From a checkpoint (a base model, or any HF DeepSeek-V3 directory with nanoseek's tokenizer),
train on JSONL chats with the next-token loss on the assistant's tokens only (the targets
are -100 elsewhere: the model learns to answer, not to predict the user). Everything around
the step is shared with pretraining: the Runtime (one process or torchrun), the budget, the
LR schedule, the expert-bias update, checkpoints with exact resume, metrics.jsonl, the
progress bar, loss.png and a summary table.

    nanoseek sft runs/base --data chats.jsonl --out runs/sft --steps 300

A batch is a pure function of (seed, step, rank) (`sft_data.get_batch`), so a resumed run
repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanoseek.data.tokenizer import Tokenizer
from nanoseek.device import allocator_note
from nanoseek.model import Transformer
from nanoseek.posttrain.errors import PostTrainError
from nanoseek.posttrain.evaluate import checkpoint_dir, load_model
from nanoseek.posttrain.sft_data import SFTData, collate, get_batch, load_sft
from nanoseek.train.balance import update_expert_bias
from nanoseek.train.checkpoint import (
    RunState,
    load_checkpoint,
    restore_optimizer,
    restore_rng,
    save_checkpoint,
)
from nanoseek.train.config import RunConfig
from nanoseek.train.metrics import Progress, plot_loss
from nanoseek.train.run import (
    StepGuard,
    apply_update,
    build_kernels,
    build_optimizer,
    check_resume,
    end_of_step,
    evaluate,
    open_run,
    set_lr,
    tick,
)
from nanoseek.train.runtime import Runtime
from nanoseek.train.schedule import LRSchedule
from nanoseek.utils import atomic_write_text, format_table, human


def _h(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class SFTConfig(RunConfig):
    init: str = _h("the checkpoint to fine-tune: a checkpoint or run directory", default="")
    data: str = _h('chats, JSONL: {"messages": [{"role", "content"}, ...]} per line', default="")
    out: str = _h("run directory: ckpt/, metrics.jsonl, loss.png, summary.json", default="")
    # budget: the first reached stops the run; the LR schedule follows the same fraction
    steps: int | None = _h("optimizer steps", default=None)
    tokens: float | None = _h("trained (assistant) tokens", default=None)
    minutes: float | None = _h("wall-clock minutes", default=None)
    # batch
    batch_size: int = _h(
        "chats per micro-batch, over all ranks (each of N processes takes batch_size / N)",
        default=16,
    )
    seq_len: int = _h("tokens per chat at most (longer ones are cut)", default=512)
    grad_accum: int = _h("micro-batches per optimizer step", default=1)
    val_examples: int = _h("chats held out of training for the validation loss", default=64)
    # optimizer and schedule: fine-tuning, so a lower peak than pretraining's and no decay
    lr: float = _h("peak learning rate", default=3e-4)
    min_lr_ratio: float = _h("final LR as a fraction of the peak", default=0.1)
    warmup_steps: int = _h("linear warm-up steps", default=10)
    schedule: str = _h("cosine, or wsd (warmup-stable-decay)", default="cosine")
    decay_frac: float = _h("wsd: the final fraction of the run that decays", default=0.2)
    weight_decay: float = _h("AdamW weight decay (matrices only)", default=0.0)
    beta1: float = _h("AdamW beta1", default=0.9)
    beta2: float = _h("AdamW beta2", default=0.95)
    grad_clip: float = _h("clip the gradient norm to this (0: off)", default=1.0)
    mtp_weight: float = _h(
        "multi-token-prediction loss weight (keeps the MTP drafts in step)", default=0.3
    )
    gamma: float = _h("expert-bias update speed (0: routing biases frozen)", default=0.001)
    # evaluation, checkpoints, logging
    eval_every: int = _h("validation loss every N steps (0: only at the end)", default=50)
    save_every: int = _h("checkpoint every N steps (0: only at the end)", default=0)
    log_every: int = _h("write metrics every N steps", default=1)
    max_bad_steps: int = _h("stop after this many non-finite losses in a row", default=5)
    # machine
    seed: int = _h("random seed (batch order, validation split)", default=0)
    device: str = _h("auto, cpu, cuda, cuda:1, ...", default="auto")
    dtype: str = _h("auto (bf16 where the hardware has it), bf16 or fp32", default="auto")
    threads: int | None = _h("CPU threads (default: torch's choice)", default=None)
    parallel: str = _h("under torchrun: fsdp (sharded) or ddp (replicated)", default="fsdp")
    ep: int = _h("under torchrun: split the routed experts over this many ranks", default=1)
    resume: bool = _h(
        "continue from OUT/ckpt exactly where it stopped, with the run's saved settings; "
        "flags may change the budget, cadence, --grad-clip and the machine, not what the run "
        "computes",
        default=False,
    )
    overwrite: bool = _h("start afresh even if OUT already holds a checkpoint", default=False)
    progress: bool = _h("show a progress bar", default=True)
    given: frozenset[str] | None = field(default=None, init=False, repr=False, compare=False)

    IDENTITY = (
        "init",
        "data",
        "batch_size",
        "seq_len",
        "grad_accum",
        "val_examples",
        "lr",
        "min_lr_ratio",
        "warmup_steps",
        "schedule",
        "decay_frac",
        "weight_decay",
        "beta1",
        "beta2",
        "mtp_weight",
        "gamma",
        "seed",
    )

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise PostTrainError(f"sft: {msg}")

        if not self.resume:
            need(bool(self.init), "give the checkpoint to fine-tune")
            need(bool(self.data), "give the chats: --data chats.jsonl")
        need(bool(self.out), "give the run directory: --out DIR")
        for name in ("batch_size", "seq_len", "grad_accum"):
            need(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1")
        need(self.val_examples >= 0, "--val-examples must be >= 0")
        need(self.lr > 0, f"--lr must be positive, got {self.lr}")
        need(self.schedule in ("cosine", "wsd"), f"--schedule cosine or wsd, not {self.schedule!r}")
        need(
            self.dtype in ("auto", "bf16", "fp32"),
            f"--dtype auto, bf16 or fp32, not {self.dtype!r}",
        )
        need(0 <= self.min_lr_ratio <= 1 and 0 < self.decay_frac <= 1, "bad LR schedule ratios")
        need(
            self.resume or any(v is not None for v in (self.steps, self.tokens, self.minutes)),
            "give a budget: --steps, --tokens or --minutes",
        )
        for name in ("steps", "tokens", "minutes"):
            v = getattr(self, name)
            need(v is None or v > 0, f"--{name} must be positive, got {v}")
        need(not (self.resume and self.overwrite), "--resume and --overwrite exclude each other")


def load_start(
    cfg: RunConfig, found: Path | None, rt: Runtime
) -> tuple[Transformer, Tokenizer, RunState, Any]:
    """Where a post-training run starts (SFT, GRPO) -> (model, tokenizer, run state, saved
    RNG state or None): the run's checkpoint on --resume, else the `cfg.init` checkpoint."""
    rng = None
    if found:
        model, state, rng = load_checkpoint(found, rt.device)
        tokenizer = Tokenizer.load(found)
        check_resume(state, cfg, tokenizer.hash, found, warn=rt.master)
    else:
        model, tokenizer = load_model(cfg.init, rt.device, torch.float32)
        state = RunState(lr_horizon=cfg.budget(), tokenizer=tokenizer.hash)
    return model, tokenizer, state, rng


def check_data_unchanged(cfg: SFTConfig, state: RunState, resumed: bool) -> None:
    """--resume refuses a chats file that changed since the run started."""
    data_hash = file_hash(cfg.data)
    if resumed and state.extra.get("data_hash") not in (None, data_hash):
        raise PostTrainError(
            f"--resume: {cfg.data} changed since the run in {cfg.out} started; restore it, "
            "or start afresh with --overwrite"
        )
    state.extra["data_hash"] = data_hash


def summarize(
    cfg: SFTConfig,
    state: RunState,
    train_data: SFTData,
    val_data: SFTData,
    val_loss: float | None,
    rt: Runtime,
    out: Path,
) -> dict[str, Any]:
    """summary.json of an SFT run."""
    return {
        "init": cfg.init,
        "data": cfg.data,
        "examples": len(train_data.examples),
        "val_examples": len(val_data.examples),
        "steps": state.step,
        "trained_tokens": state.tokens,
        "epochs": state.step * cfg.batch_size * cfg.grad_accum / max(len(train_data.examples), 1),
        "wall_seconds": state.train_seconds,
        "elapsed_seconds": state.elapsed,
        "tokens_per_second": state.tokens / max(state.train_seconds, 1e-9),
        "final_loss": last_loss(out / "metrics.jsonl"),
        "final_val_loss": val_loss,
        "device": str(rt.device),
        "dtype": str(rt.dtype)[6:],
        "world_size": rt.world,
        "checkpoint": str(out / "ckpt"),
    }


def sft(cfg: SFTConfig) -> dict[str, Any]:
    cfg.validate()
    cfg, found = open_run(cfg)  # on --resume: the run's saved settings, and its checkpoint
    out, ckpt_dir = Path(cfg.out), Path(cfg.out) / "ckpt"
    with Runtime.start(cfg.device, cfg.dtype, cfg.threads, cfg.parallel, cfg.ep) as rt:
        if cfg.batch_size % rt.world:
            raise PostTrainError(
                f"sft: --batch-size {cfg.batch_size} (over all ranks) does not split evenly over "
                f"{rt.world} processes"
            )
        # --- model, tokenizer, data, optimizer: new, or as the checkpoint left them -----------
        source = found or checkpoint_dir(cfg.init)  # of the tokenizer (fresh: the weights)
        model, tokenizer, state, rng = load_start(cfg, found, rt)
        check_data_unchanged(cfg, state, found is not None)
        state.train_config = cfg.to_dict()
        train_data, val_data = split(load_sft(cfg.data, tokenizer, cfg.seq_len), cfg)
        moe_layers = model.moe_layers()
        model.train()
        mtp_idle = cfg.mtp_weight == 0 and model.config.num_nextn_predict_layers > 0
        step_model = rt.wrap(model, unused_parameters=mtp_idle)
        optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
        if found:
            restore_optimizer(found, model, optimizer)
            restore_rng(rng)
        if rt.master:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "sft_config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
            print(
                f"sft {cfg.init} ({human(model.num_params())} parameters) on {rt.device} "
                f"{str(rt.dtype)[6:]}{allocator_note(rt.device)}, {rt.world} process(es): "
                f"{train_data.summary()}, "
                f"{len(val_data.examples)} held out -> {out}",
                file=sys.stderr,
            )

        def validate() -> dict[str, float]:
            batches = val_batches(val_data, cfg.batch_size, tokenizer.pad_id)
            return {"val_loss": evaluate(model, batches, rt)}

        def save() -> None:
            save_checkpoint(ckpt_dir, model, optimizer, state, source)  # every rank: a collective

        # --- the loop --------------------------------------------------------------------------
        stop, horizon = cfg.budget(), state.lr_horizon
        schedule = LRSchedule(
            cfg.lr, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio, cfg.decay_frac
        )
        guard = StepGuard(cfg.max_bad_steps, ckpt_dir, warn=rt.master)
        n_experts = (len(moe_layers), model.config.n_routed_experts)
        counts = torch.zeros(n_experts, dtype=torch.long, device=rt.device)
        stats = torch.zeros(3, device=rt.device)  # loss x trained tokens, trained tokens, total
        val_loss = None
        build_kernels(rt)  # a first run's kernel compile, before the clock
        t_start = time.perf_counter() - state.elapsed
        progress = Progress(
            out / "metrics.jsonl",
            rt.master,
            cfg.progress,
            cfg.steps,
            state.step if found else None,
            cfg.log_every,
            show={"loss": ".3f", "val_loss": ".3f", "tok_per_s": ",.0f"},
        )
        every = (cfg.eval_every, cfg.save_every)  # evaluate / checkpoint cadence
        val = validate if val_data.examples else None
        with progress:
            while state.progress(stop) < 1.0:
                step, t0 = state.step, time.perf_counter()
                lr = set_lr(optimizer, schedule(step, state.progress(horizon)))
                n_step = accumulate_gradients(
                    step_model, train_data, step, cfg, tokenizer.pad_id, rt, counts, stats
                )
                rt.all_reduce_sum(counts)
                rt.all_reduce_sum(stats)
                loss, total = (stats[0] / stats[1]).item(), (stats[2] / stats[1]).item()
                norm, taken = apply_update(model, optimizer, guard, rt, step, total, cfg.grad_clip)
                state.step += 1
                state.tokens += int(n_step)
                if taken and moe_layers and cfg.gamma > 0:
                    update_expert_bias(moe_layers, counts, cfg.gamma)
                dt = tick(state, t0, t_start, rt, stop, horizon)

                rec: dict[str, Any] = {
                    "step": state.step,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": norm,
                    "tokens": state.tokens,
                    "tok_per_s": n_step / dt,
                    "elapsed": state.elapsed,
                    "train_seconds": state.train_seconds,
                }
                end_of_step(state, stop, rec, progress, guard, every, val, save)
                val_loss = rec.get("val_loss", val_loss)

        # --- summary ---------------------------------------------------------------------------
        if val_loss is None and val_data.examples:  # resumed a finished run
            val_loss = validate()["val_loss"]
        if not rt.master:
            return {}
        summary = summarize(cfg, state, train_data, val_data, val_loss, rt, out)
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        plot_loss(out / "metrics.jsonl", out / "loss.png", f"SFT of {cfg.init} on {cfg.data}")
        print(summary_table(summary), file=sys.stderr)
        return summary


def split(data: SFTData, cfg: SFTConfig) -> tuple[SFTData, SFTData]:
    """(training, validation) examples: a seeded choice of val_examples chats is held out
    (at most a tenth of the data, so a small file still trains)."""
    n = len(data.examples)
    n_val = min(cfg.val_examples, n // 10)
    order = np.random.default_rng([cfg.seed, 1]).permutation(n)
    held = set(order[:n_val].tolist())
    train = [e for i, e in enumerate(data.examples) if i not in held]
    val = [e for i, e in enumerate(data.examples) if i in held]
    return dataclasses.replace(data, examples=train), dataclasses.replace(data, examples=val)


def accumulate_gradients(
    step_model: torch.nn.Module,
    data: SFTData,
    step: int,
    cfg: SFTConfig,
    pad_id: int,
    rt: Runtime,
    counts: torch.Tensor,
    stats: torch.Tensor,
) -> float:
    """Forward and backward over the step's micro-batches (gradients synced on the last).
    `counts` (expert loads) and `stats` ([loss x n, n, total loss x n]) are reset and filled
    with this rank's part. -> the step's trained tokens over all ranks."""
    counts.zero_()
    stats.zero_()
    batches = [
        get_batch(
            data, cfg.batch_size, cfg.seed, step * cfg.grad_accum + m, pad_id, rt.rank, rt.world
        )
        for m in range(cfg.grad_accum)
    ]
    # every assistant token of the step weighs the same, however the micro-batches split
    # them: each micro-batch's mean loss is scaled by its share of the tokens
    n_step = rt.all_reduce_sum(float(sum((y != -100).sum() for _, y in batches)))
    for micro, (x, y) in enumerate(batches):
        x, y = x.to(rt.device), y.to(rt.device)
        n = (y != -100).sum().float()
        with rt.sync_grads(step_model, sync=micro == cfg.grad_accum - 1):
            with rt.autocast():
                o = step_model(
                    x,
                    targets=y,
                    mtp_weight=cfg.mtp_weight,
                    counted=x != pad_id,  # padding balances nothing
                )
            # DDP averages over ranks: scale by world so the sum over ranks counts
            (o.loss * n * rt.world / n_step).backward()
        stats += torch.stack([o.main_loss.detach().float() * n, n, o.loss.detach() * n])
        if o.expert_counts is not None:
            counts += o.expert_counts
    return n_step


def val_batches(data: SFTData, batch_size: int, pad_id: int):
    for i in range(0, len(data.examples), batch_size):
        yield collate(data.examples[i : i + batch_size], pad_id)


def file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except FileNotFoundError:
        raise PostTrainError(f"no SFT data at {path}; give a .jsonl file of chats") from None
    return h.hexdigest()[:16]


def last_loss(metrics: Path) -> float | None:
    from nanoseek.train.metrics import read_metrics

    recs = [r["loss"] for r in read_metrics(metrics) if r.get("loss") is not None]
    return recs[-1] if recs else None


def summary_table(s: dict[str, Any]) -> str:
    val = "-" if s["final_val_loss"] is None else f"{s['final_val_loss']:.4f}"
    loss = "-" if s["final_loss"] is None else f"{s['final_loss']:.4f}"
    rows = [
        ("data", f"{s['examples']:,} chats ({s['val_examples']} held out) from {s['data']}"),
        (
            "trained",
            f"{s['steps']} steps, {human(s['trained_tokens'])} assistant tokens, "
            f"{s['epochs']:.2f} epochs",
        ),
        (
            "training time",
            f"{s['wall_seconds']:.0f} s ({s['tokens_per_second']:,.0f} trained "
            f"tokens/s); {s['elapsed_seconds']:.0f} s in all",
        ),
        ("loss (assistant tokens)", f"train {loss}, validation {val} nats/token"),
        ("checkpoint", s["checkpoint"]),
    ]
    return format_table(rows, "\nsft summary")
