"""The pretraining loop, top to bottom: set-up, model, optimizer, then one optimizer step per
iteration (micro-batches, clip, step, expert-bias update), evaluation and checkpoints.

Runs as one process, or under `torchrun` (one process per device, DDP, gradients and expert
loads summed over ranks). Batches are a pure function of (seed, step, rank), and the LR a
pure function of the step, so a resumed run (which takes its settings from the checkpoint)
repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nanoseek.compute import flops_per_token, measure_matmul_peak
from nanoseek.config import get_preset, human
from nanoseek.data import BatchLoader, prepare, read_meta
from nanoseek.model import Transformer
from nanoseek.train.balance import gamma_at, load_imbalance, update_expert_bias
from nanoseek.train.checkpoint import (
    find_checkpoint,
    load_checkpoint,
    read_train_state,
    restore_rng,
    save_checkpoint,
)
from nanoseek.train.config import BUDGET, TrainConfig, TrainError, resume_config
from nanoseek.train.metrics import MetricsLog, format_table, plot_loss, unigram_loss
from nanoseek.train.schedule import lr_at
from nanoseek.utils import atomic_write_text


def available_devices() -> list[str]:
    names = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message lists every backend it knows, not what is here
        device = None
    ok = device is not None and (
        device.type == "cpu"
        or (device.type == "cuda" and (device.index or 0) < torch.cuda.device_count())
        or (device.type == "mps" and torch.backends.mps.is_available())
    )
    if not ok:
        raise TrainError(
            f"--device {name!r} is not available here; available: auto, "
            + ", ".join(available_devices())
        )
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 autocast on GPUs and on CPUs with native bf16 matmul (AMX / AVX512-BF16)."""
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def resolve_data(tc: TrainConfig, rank: int = 0, world: int = 1) -> Path:
    """A shard directory as is; anything else is a corpus, prepared (once) into data_dir."""
    p = Path(tc.data).expanduser()
    if (p / "meta.json").is_file():
        return p
    out = Path(tc.data_dir) if tc.data_dir else Path(tc.out) / "data"
    if world == 1:
        return prepare(tc.data, out, vocab_size=tc.vocab_size, verbose=True)
    # Rank 0 prepares; the others wait, then read it (all at once would race on the files).
    error = None
    if rank == 0:
        try:
            prepare(tc.data, out, vocab_size=tc.vocab_size, verbose=True)
        except Exception as e:  # reach the barrier anyway, or the other ranks hang in it
            error = e
    dist.barrier()
    if error is not None:
        raise error
    if not (out / "meta.json").is_file():
        raise TrainError(f"rank 0 could not prepare {tc.data} into {out} (see its error)")
    return out


def budget_fraction(budget: dict[str, Any], step: int, tokens: int, elapsed: float) -> float:
    """How far through `budget` ({steps, tokens, minutes}, any of them None) the run is."""
    fracs = [0.0]
    if budget["steps"]:
        fracs.append(step / budget["steps"])
    if budget["tokens"]:
        fracs.append(tokens / budget["tokens"])
    if budget["minutes"]:
        fracs.append(elapsed / (60 * budget["minutes"]))
    return max(fracs)


def _budget_str(budget: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in budget.items() if v) or "none"


def build_optimizer(model: Transformer, tc: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices; not norms
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]  # fmt: skip
    # fused: one kernel over all parameters (CPU and CUDA), ~2x the default on this model
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=1e-8, fused=True)


def train(tc: TrainConfig) -> dict[str, Any]:
    tc.validate()
    out = Path(tc.out)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    master = rank == 0

    # --- the run to resume: its saved settings come first -----------------------------------
    ckpt_dir = out / "ckpt"
    found = find_checkpoint(ckpt_dir)
    if found and not (tc.resume or tc.overwrite):
        raise TrainError(f"{out} already holds a checkpoint; pass --resume to continue it or "
                         "--overwrite to start afresh")  # fmt: skip
    if tc.resume and not found:
        raise TrainError(f"--resume: no checkpoint in {ckpt_dir}")
    horizon = tc.budget()  # what the LR schedule and the expert-bias speed run over
    if tc.resume:
        saved = read_train_state(found)
        tc = resume_config(tc, saved.get("train_config"))
        saved_tc = saved.get("train_config") or {}
        horizon = saved.get("lr_horizon") or {k: saved_tc.get(k) for k in BUDGET}
        if horizon != tc.budget() and master:
            warnings.warn(f"--resume: the budget changed ({_budget_str(horizon)} -> "
                          f"{_budget_str(tc.budget())}); the run stops at the new one, but the LR "
                          "schedule keeps its original horizon so the LR does not jump (past it, "
                          "the LR stays at its final value). To plan a new schedule, start a "
                          "fresh run (--overwrite)", stacklevel=2)  # fmt: skip

    # --- processes and devices -------------------------------------------------------------
    device = pick_device(tc.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if tc.threads:
        torch.set_num_threads(tc.threads)
    dtype = pick_dtype(tc.dtype, device)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else nullcontext())  # fmt: skip

    # --- data ------------------------------------------------------------------------------
    shard_dir = resolve_data(tc, rank, world)
    meta = read_meta(shard_dir)
    vocab = meta["tokenizer"]["vocab_size"]
    train_data = BatchLoader(shard_dir, "train", tc.batch_size, tc.seq_len, tc.seed, rank, world)
    val_data = BatchLoader(shard_dir, "val", tc.batch_size, tc.seq_len, tc.seed, rank, world)

    # --- model, optimizer, and the state to resume ------------------------------------------
    state: dict[str, Any] = {"step": 0, "tokens": 0, "elapsed": 0.0, "train_seconds": 0.0}
    if tc.resume:
        model, state, opt_state, rng = load_checkpoint(found, device)
        if state["tokenizer"] != meta["tokenizer"]["hash"]:
            raise TrainError(f"{found} was trained with tokenizer {state['tokenizer']}, but the "
                             f"shards in {shard_dir} use {meta['tokenizer']['hash']}")  # fmt: skip
    else:
        cfg = get_preset(tc.preset).replace(**tc.model)
        if cfg.vocab_size != vocab:  # the model's vocabulary is the tokenizer's
            cfg = cfg.replace(vocab_size=vocab)
        if cfg.max_position_embeddings < tc.seq_len:
            cfg = cfg.replace(max_position_embeddings=tc.seq_len)
        torch.manual_seed(tc.seed)
        model = Transformer(cfg).to(device)
    cfg = model.config
    model.train()
    moe_layers = model.moe_layers()
    for moe in moe_layers:
        moe.balance_alpha = tc.alpha
    optimizer = build_optimizer(model, tc, device)
    if tc.resume:
        optimizer.load_state_dict(opt_state)
        restore_rng(rng)
    step_model = model
    if world > 1:  # biases are updated identically on every rank from all-reduced counts
        unused = tc.mtp_weight == 0 and cfg.num_nextn_predict_layers > 0  # MTP modules idle
        step_model = torch.nn.parallel.DistributedDataParallel(
            model, broadcast_buffers=False, find_unused_parameters=unused
        )
    if tc.compile:
        step_model = torch.compile(step_model)

    # --- accounting ------------------------------------------------------------------------
    tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum * world
    # MTP modules that never run (mtp_weight 0) cost no FLOPs
    counted = cfg if tc.mtp_weight > 0 else cfg.replace(num_nextn_predict_layers=0)
    fpt = flops_per_token(counted, tc.seq_len, training=True)
    peak = measure_matmul_peak(dtype, str(device)) if master else 0.0
    if master:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.json")
        atomic_write_text(out / "train_config.json", json.dumps(tc.to_dict(), indent=2) + "\n")
    log = (
        MetricsLog(out / "metrics.jsonl", state["step"] if tc.resume else None) if master else None
    )

    stop_at = tc.budget()

    def progress(budget: dict[str, Any] | None = None) -> float:
        """The fraction done of `budget`; by default the one the run stops at."""
        return budget_fraction(budget or stop_at, state["step"], state["tokens"], state["elapsed"])

    def reduce_mean(x: float) -> float:
        if world == 1:
            return x
        t = torch.tensor([x], device=device)
        dist.all_reduce(t)
        return t.item() / world

    @torch.no_grad()
    def evaluate() -> tuple[float, float]:
        model.eval()
        losses = []
        for x, y in val_data.val_batches(tc.eval_batches):
            with autocast:
                losses.append(
                    model(x.to(device), targets=y.to(device), mtp_weight=0).main_loss.item()
                )
        model.train()
        loss = reduce_mean(sum(losses) / len(losses))
        return loss, val_data.bits_per_byte(loss)

    def checkpoint() -> None:
        if master:
            save_checkpoint(ckpt_dir, model, optimizer, {**state, "tokenizer": meta["tokenizer"]["hash"],
                            "train_config": tc.to_dict(), "lr_horizon": horizon}, shard_dir)  # fmt: skip
        if world > 1:
            dist.barrier()

    bar = None
    if master and tc.progress:
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=state["step"], unit="step", dynamic_ncols=True,
                   file=sys.stderr, disable=None)  # fmt: skip
    if master:
        n = sum(p.numel() for p in model.parameters())
        print(f"training {tc.preset} ({human(n)} parameters, vocab {vocab}) on {device} {str(dtype)[6:]}, "
              f"{world} process(es), {tokens_per_step:,} tokens/step -> {out}", file=sys.stderr)  # fmt: skip

    # --- the loop --------------------------------------------------------------------------
    bad_steps, val_loss, val_bpb = 0, None, None
    counts = torch.zeros(len(moe_layers), cfg.n_routed_experts, dtype=torch.long, device=device)
    t_start = time.perf_counter() - state["elapsed"]
    while progress() < 1.0:
        step = state["step"]
        t0 = time.perf_counter()
        lr = lr_at(step, progress(horizon), tc.lr, tc.warmup_steps, tc.schedule, tc.min_lr_ratio,
                   tc.decay_frac)  # fmt: skip
        for group in optimizer.param_groups:
            group["lr"] = lr
        counts.zero_()
        # total: what is minimised (main + MTP + balance); main and MTP are logged separately
        sums = torch.zeros(3, device=device)  # total, main, mean MTP; each a mean over micros
        for micro in range(tc.grad_accum):
            x, y = train_data.get_batch(step * tc.grad_accum + micro)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sync = (step_model.no_sync() if world > 1 and micro < tc.grad_accum - 1
                    else nullcontext())  # fmt: skip
            with sync:
                with autocast:
                    o = step_model(x, targets=y, mtp_weight=tc.mtp_weight)
                (o.loss / tc.grad_accum).backward()
            sums[0] += o.loss.detach() / tc.grad_accum
            sums[1] += o.main_loss.detach() / tc.grad_accum
            if o.mtp_losses:
                sums[2] += torch.stack(o.mtp_losses).detach().mean() / tc.grad_accum
            for i, moe in enumerate(moe_layers):
                if moe.tokens_per_expert is not None:  # None: an MTP layer that did not run
                    counts[i] += moe.tokens_per_expert
                    moe.tokens_per_expert = None
        if world > 1:
            dist.all_reduce(counts)
            dist.all_reduce(sums)
            sums /= world
        norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf
        )
        (total_value, loss_value, mtp_value), norm_value = sums.tolist(), norm.item()
        state["step"] += 1
        state["tokens"] += tokens_per_step
        if math.isfinite(total_value) and math.isfinite(norm_value):
            optimizer.step()
            if moe_layers:
                update_expert_bias(
                    moe_layers, counts, gamma_at(progress(horizon), tc.gamma, tc.gamma_final)
                )
            bad_steps = 0
        else:  # skip: no update, no bias change; several in a row means the run diverged
            bad_steps += 1
            if master:
                warnings.warn(f"step {step}: non-finite loss ({total_value}) or gradient norm "
                              f"({norm_value}); step skipped", stacklevel=1)  # fmt: skip
            if bad_steps >= tc.max_bad_steps:
                optimizer.zero_grad(set_to_none=True)
                if bar:
                    bar.close()
                last = find_checkpoint(ckpt_dir)
                raise TrainError(
                    f"loss was non-finite for {bad_steps} steps in a row (up to step {step}); run "
                    f"stopped. Last good checkpoint: {last or 'none'}. Try --grad-clip 1 or "
                    "--dtype fp32 (with --resume), or a lower --lr (a fresh run: --overwrite)")  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        state["train_seconds"] += dt
        state["elapsed"] = time.perf_counter() - t_start
        if world > 1 and tc.minutes:  # every rank must agree on when the time is up
            t = torch.tensor([state["elapsed"]], dtype=torch.float64, device=device)
            dist.broadcast(t, 0)
            state["elapsed"] = t.item()

        # --- logging, evaluation, checkpoints ----------------------------------------------
        step = state["step"]
        tok_s = tokens_per_step / dt
        mfu = fpt * tok_s / (peak * world) if master else 0.0
        done = progress() >= 1.0
        rec: dict[str, Any] = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": norm_value,
                               "tokens": state["tokens"], "tok_per_s": tok_s, "mfu": mfu,
                               "elapsed": state["elapsed"], "train_seconds": state["train_seconds"]}  # fmt: skip
        if tc.mtp_weight > 0 and cfg.num_nextn_predict_layers > 0:
            rec["mtp_loss"] = mtp_value
        if moe_layers:
            rec["load_max_mean"] = [round(v, 3) for v in load_imbalance(counts)]
        if (tc.eval_every and step % tc.eval_every == 0) or done:
            val_loss, val_bpb = evaluate()
            rec.update(val_loss=val_loss, val_bpb=val_bpb)
        if master and (step % tc.log_every == 0 or "val_loss" in rec or done):
            log.write(rec)
        if bar is not None:
            p = progress()
            if not tc.steps and p > 0:  # the budget is tokens or minutes: estimate the steps
                bar.total = max(step, round(step / p))
            post = {"loss": f"{loss_value:.3f}", "tok/s": f"{tok_s:,.0f}", "mfu": f"{mfu:.1%}"}
            if moe_layers:
                post["load"] = f"{max(rec['load_max_mean']):.2f}"
            if val_loss is not None:
                post["val"] = f"{val_loss:.3f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
        if (tc.save_every and step % tc.save_every == 0 and bad_steps == 0) or done:
            checkpoint()
    if bar is not None:
        bar.close()

    # --- summary ---------------------------------------------------------------------------
    summary: dict[str, Any] = {}
    if val_loss is None:  # resumed a finished run: nothing was trained
        val_loss, val_bpb = evaluate()
    if master:
        total_flops = fpt * state["tokens"]
        unigram = unigram_loss(train_data.data, vocab)
        summary = {
            "preset": tc.preset, "steps": state["step"], "tokens_seen": state["tokens"],
            "wall_seconds": state["train_seconds"], "elapsed_seconds": state["elapsed"],
            "flops_per_token": fpt, "total_flops": total_flops,
            "mfu": total_flops / max(state["train_seconds"], 1e-9) / (peak * world),
            "peak_flops": peak * world, "device": str(device), "dtype": str(dtype)[6:],
            "world_size": world, "seq_len": tc.seq_len, "final_val_loss": val_loss,
            "final_val_bpb": val_bpb, "unigram_loss": unigram,
            "tokens_per_second": state["tokens"] / max(state["train_seconds"], 1e-9),
            "checkpoint": str(ckpt_dir),
        }  # fmt: skip
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        plot_loss(
            out / "metrics.jsonl", out / "loss.png", f"{tc.preset} on {meta['source']['data']}"
        )
        print(summary_table(summary), file=sys.stderr)
    if world > 1:
        dist.destroy_process_group()
    return summary


def summary_table(s: dict[str, Any]) -> str:
    rows = [
        ("tokens seen", f"{human(s['tokens_seen'])} in {s['steps']} steps"),
        ("training time", f"{s['wall_seconds']:.0f} s ({s['tokens_per_second']:,.0f} tokens/s); "
                          f"{s['elapsed_seconds']:.0f} s with evaluation and checkpoints"),
        ("validation loss", f"{s['final_val_loss']:.4f} nats/token, {s['final_val_bpb']:.3f} bits/byte"),
        ("unigram baseline", f"{s['unigram_loss']:.4f} nats/token (a model that ignores context)"),
        ("training FLOPs", f"{s['total_flops']:.3g} ({human(s['flops_per_token'])} per token)"),
        ("MFU", f"{s['mfu']:.1%} of {s['peak_flops'] / 1e12:.2f} TFLOP/s ({s['dtype']} matmul peak "
                f"measured on {s['device']})"),
        ("checkpoint", s["checkpoint"]),
    ]  # fmt: skip
    return format_table(rows, "\nrun summary")
