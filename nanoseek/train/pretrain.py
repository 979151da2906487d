"""The pretraining loop, top to bottom: the run and its process, data, model and optimizer,
then one optimizer step per iteration (micro-batches, clip, step, expert-bias update),
evaluation, metrics and checkpoints, and the summary.

Runs as one process, or under `torchrun` (one process per device, DDP, gradients and expert
loads summed over ranks). Batches are a pure function of (seed, step, rank), and the LR a
pure function of the step and the run's progress, so a resumed run (which takes its settings
from the checkpoint) repeats the uninterrupted one exactly.

The model is a `Transformer` (V2 / V3 / V3.2 presets) or, for a V4 preset (tiny-v4), a
`V4Transformer`: both return the same ModelOutput (loss, expert counts of the balanced
layers), so the loop treats them alike; V4 runs on one process only.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from nanoseek.compute import flops_per_token, measure_matmul_peak
from nanoseek.config import ModelConfig, V4Config, get_preset
from nanoseek.data import BatchLoader, prepare, read_meta
from nanoseek.device import allocator_note
from nanoseek.model import Transformer, V4Transformer
from nanoseek.model.indexer import indexer_kl
from nanoseek.model.v4 import indexer_kl_v4
from nanoseek.train.balance import gamma_at, load_imbalance, update_expert_bias
from nanoseek.train.branch import at_peak_lr, keep_checkpoint, open_branch
from nanoseek.train.budget import Budget
from nanoseek.train.checkpoint import (
    RunState,
    load_checkpoint,
    restore_optimizer,
    restore_rng,
    save_checkpoint,
)
from nanoseek.train.config import TrainConfig, TrainError
from nanoseek.train.metrics import Progress, plot_loss, summary_table, unigram_loss
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
from nanoseek.utils import atomic_write_text, human


def train(tc: TrainConfig) -> dict[str, Any]:
    tc.validate()
    # on --resume: the run's saved settings and its checkpoint; --decay-from: the trunk's
    tc, found = open_branch(tc) if tc.decay_from else open_run(tc)
    out, ckpt_dir = Path(tc.out), Path(tc.out) / "ckpt"
    with Runtime.start(tc.device, tc.dtype, tc.threads, tc.parallel, tc.ep) as rt:
        # --- data, model, optimizer: new, or as the checkpoint left them ----------------------
        data = prepare_data(tc, rt)
        meta = read_meta(data)
        tokenizer = meta["tokenizer"]
        loader = {
            split: BatchLoader(data, split, tc.batch_size, tc.seq_len, tc.seed, rt.rank, rt.world)
            for split in ("train", "val")
        }
        model, state, step_model, optimizer = start_training(tc, found, rt, tokenizer, data)
        cfg, moe_layers = model.config, model.moe_layers()
        indexer_weight = indexer_loss_weight(tc, cfg.has_indexer, rt)
        fpt, peak = accounting(tc, cfg, rt)
        if rt.master:
            start_run_files(tc, rt, model, out)

        def validate() -> dict[str, float]:
            loss = evaluate(model, loader["val"].val_batches(tc.eval_batches), rt)
            return {"val_loss": loss, "val_bpb": loader["val"].bits_per_byte(loss)}

        def save() -> None:
            save_checkpoint(ckpt_dir, model, optimizer, state, data)  # every rank: a collective
            if rt.master and tc.keep_every and state.step % tc.keep_every == 0:
                keep_checkpoint(ckpt_dir, state.step)

        if not found and tc.indexer_warmup_steps:
            warm_up_indexers(model, loader["train"], tc, rt)

        # --- the loop --------------------------------------------------------------------------
        stop, horizon = tc.budget(), state.lr_horizon  # where the run ends; what the LR runs over
        schedule = LRSchedule(
            tc.lr, tc.warmup_steps, tc.schedule, tc.min_lr_ratio, tc.decay_frac, tc.decay_shape
        )
        guard = StepGuard(tc.max_bad_steps, ckpt_dir, warn=rt.master)
        n_experts = (len(moe_layers), cfg.n_routed_experts)
        counts = torch.zeros(n_experts, dtype=torch.long, device=rt.device)  # tokens per expert
        losses = torch.zeros(4, device=rt.device)  # total (minimised), main, mean MTP, indexer
        val_loss = val_bpb = None
        build_kernels(rt)  # a first run's kernel compile, before the clock
        t_start = time.perf_counter() - state.elapsed
        resume_step = state.step if found else None
        progress = Progress(
            out / "metrics.jsonl", rt.master, tc.progress, tc.steps, resume_step, tc.log_every
        )
        # evaluate / checkpoint cadence: a kept checkpoint is written as the latest one too
        every = (tc.eval_every, math.gcd(tc.save_every, tc.keep_every))
        with progress:
            while state.progress(stop) < 1.0:
                step, t0 = state.step, time.perf_counter()
                decaying = tc.schedule == "wsd" and not at_peak_lr(state, horizon, tc.decay_frac)
                lr = set_lr(optimizer, schedule(step, state.progress(horizon)))
                batch = tc.batch_at(state.tokens)
                accumulate_gradients(
                    step_model,
                    model,
                    loader["train"],
                    step,
                    batch,
                    tc,
                    rt,
                    indexer_weight,
                    counts,
                    losses,
                )
                rt.all_reduce_sum(counts)
                rt.all_reduce_mean(losses)
                total, loss, mtp_loss, index_loss = losses.tolist()
                norm, taken = apply_update(model, optimizer, guard, rt, step, total, tc.grad_clip)
                state.step += 1
                tokens_per_step = batch * tc.seq_len * tc.grad_accum  # over all ranks
                state.tokens += tokens_per_step
                if taken and moe_layers:  # a skipped step moves no bias either
                    speed = bias_speed(tc, state, horizon, decaying)
                    update_expert_bias(moe_layers, counts, speed)
                dt = tick(state, t0, t_start, rt, stop, horizon)

                # --- metrics, evaluation, checkpoints ------------------------------------------
                rec = step_record(state, loss, lr, norm, tokens_per_step / dt, fpt / peak)
                if tc.mtp_weight > 0 and cfg.num_nextn_predict_layers > 0:
                    rec["mtp_loss"] = mtp_loss
                if indexer_weight:
                    rec["indexer_kl"] = index_loss
                if tc.batch_ramp:
                    rec["batch_size"] = batch
                if moe_layers:
                    rec["load_max_mean"] = [round(v, 3) for v in load_imbalance(counts)]
                end_of_step(state, stop, rec, progress, guard, every, validate, save)
                if "val_loss" in rec:
                    val_loss, val_bpb = rec["val_loss"], rec["val_bpb"]

        # --- summary ---------------------------------------------------------------------------
        if val_loss is None:  # resumed a finished run: nothing was trained
            last = validate()
            val_loss, val_bpb = last["val_loss"], last["val_bpb"]
        if not rt.master:
            return {}
        val = (val_loss, val_bpb)
        return finish(tc, rt, state, fpt, peak, val, loader["train"], meta, cfg.vocab_size)


def start_training(
    tc: TrainConfig, found: Path | None, rt: Runtime, tokenizer: dict, data: Path
) -> tuple[Transformer | V4Transformer, RunState, torch.nn.Module, torch.optim.Optimizer]:
    """-> (model, run state, the model as each step runs it (wrapped for DDP / FSDP,
    compiled), its optimizer): fresh, or as the run's checkpoint left them."""
    model, state, rng = start_model(tc, found, rt, tokenizer, data)
    cfg = model.config
    model.train()
    mtp_idle = tc.mtp_weight == 0 and cfg.num_nextn_predict_layers > 0
    unused = mtp_idle or cfg.has_indexer  # DDP: the indexers get no gradient through it
    step_model = rt.wrap(model, unused_parameters=unused, compile=tc.compile)
    optimizer = build_optimizer(
        model,
        tc.lr,
        tc.weight_decay,
        (tc.beta1, tc.beta2),
        tc.optimizer,
        tc.router_lr,
        tc.optim_states,
        tc.expert_beta2,
        tc.expert_lr,
        tc.expert_weight_decay,
    )
    if found:
        restore_optimizer(found, model, optimizer)
        restore_rng(rng)
    return model, state, step_model, optimizer


def accounting(tc: TrainConfig, cfg: ModelConfig | V4Config, rt: Runtime) -> tuple[float, float]:
    """-> (training FLOPs a token, the matmul peak over all ranks; inf off the master rank,
    which logs no MFU). MTP modules that never run (mtp_weight 0) cost no FLOPs."""
    counted = cfg if tc.mtp_weight > 0 else cfg.replace(num_nextn_predict_layers=0)
    fpt = flops_per_token(counted, tc.seq_len, training=True)
    peak = measure_matmul_peak(rt.dtype, str(rt.device)) * rt.world if rt.master else math.inf
    return fpt, peak


def replans_decay(state: RunState, tc: TrainConfig, has_experts: bool) -> bool:
    """Whether a wsd run resumed with a new budget takes it as its LR horizon: when it is at
    its peak LR under both budgets nothing jumps, and it decays as a run of the new budget
    would (a decay branch's converse). Not when the experts' bias speed falls over the
    horizon (`--gamma-tokens 0`): that would jump."""
    if tc.schedule != "wsd" or state.lr_horizon == tc.budget():
        return False
    stable = all(at_peak_lr(state, h, tc.decay_frac) for h in (state.lr_horizon, tc.budget()))
    return stable and (tc.gamma_tokens > 0 or not has_experts)


def bias_speed(tc: TrainConfig, state: RunState, horizon: Budget, decaying: bool) -> float:
    """gamma after this step: --gamma-decay if given and the step's wsd LR was decaying,
    else falling over --gamma-tokens, or over the run's horizon."""
    if decaying and tc.gamma_decay is not None:
        return tc.gamma_decay
    done = state.tokens / tc.gamma_tokens if tc.gamma_tokens else state.progress(horizon)
    return gamma_at(done, tc.gamma, tc.gamma_final)


def start_model(
    tc: TrainConfig, found: Path | None, rt: Runtime, tokenizer: dict, data: Path
) -> tuple[Transformer | V4Transformer, RunState, Any]:
    """-> (model, run state, saved RNG state or None): from the run's checkpoint on
    --resume (checked against these settings and data), else a fresh model."""
    rng = None
    if found:
        model, state, rng = load_checkpoint(found, rt.device)
        if tc.decay_from or replans_decay(state, tc, bool(model.moe_layers())):
            state.lr_horizon = tc.budget()  # the decay planned over the new budget
        check_resume(state, tc, tokenizer["hash"], data, warn=rt.master)
    else:
        model = new_model(tc, tokenizer["vocab_size"], rt.device)
        state = RunState(lr_horizon=tc.budget(), tokenizer=tokenizer["hash"])
    state.train_config = tc.to_dict()
    check_v4(model, tc, rt)
    return model, state, rng


def step_record(
    state: RunState, loss: float, lr: float, norm: float, tok_per_s: float, mfu_per_tok: float
) -> dict[str, Any]:
    """The metrics every step logs (the caller adds MTP, indexer and load figures)."""
    return {
        "step": state.step,
        "loss": loss,
        "lr": lr,
        "grad_norm": norm,
        "tokens": state.tokens,
        "tok_per_s": tok_per_s,
        "mfu": mfu_per_tok * tok_per_s,
        "elapsed": state.elapsed,
        "train_seconds": state.train_seconds,
    }


def finish(
    tc: TrainConfig,
    rt: Runtime,
    state: RunState,
    fpt: float,
    peak: float,
    val: tuple[float, float],
    train_loader: BatchLoader,
    meta: dict,
    vocab_size: int,
) -> dict[str, Any]:
    """summary.json, loss.png and the summary table (rank 0)."""
    out = Path(tc.out)
    unigram = unigram_loss(train_loader.data, vocab_size)
    summary = summarize(tc, rt, state, fpt, peak, *val, unigram)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    plot_loss(out / "metrics.jsonl", out / "loss.png", f"{tc.preset} on {meta['source']['data']}")
    print(summary_table(summary), file=sys.stderr)
    return summary


def summarize(
    tc: TrainConfig,
    rt: Runtime,
    state: RunState,
    fpt: float,
    peak: float,
    val_loss: float,
    val_bpb: float,
    unigram: float,
) -> dict[str, Any]:
    """summary.json: what the run did, its cost and its result."""
    train_seconds = max(state.train_seconds, 1e-9)
    return {
        "preset": tc.preset,
        "steps": state.step,
        "tokens_seen": state.tokens,
        "wall_seconds": state.train_seconds,
        "elapsed_seconds": state.elapsed,
        "flops_per_token": fpt,
        "total_flops": fpt * state.tokens,
        "mfu": fpt * state.tokens / train_seconds / peak,
        "peak_flops": peak,
        "device": str(rt.device),
        "dtype": str(rt.dtype)[6:],
        "world_size": rt.world,
        "seq_len": tc.seq_len,
        "final_val_loss": val_loss,
        "final_val_bpb": val_bpb,
        "unigram_loss": unigram,
        "tokens_per_second": state.tokens / train_seconds,
        "checkpoint": str(Path(tc.out) / "ckpt"),
    }


def indexer_loss_weight(tc: TrainConfig, has_indexer: bool, rt: Runtime) -> float:
    """V3.2 and V4 (CSA layers): the weight of the indexers' own KL in the loss (the LM loss
    never reaches them); 0 for models without an indexer."""
    weight = tc.indexer_loss_weight if has_indexer else 0.0
    if weight and rt.world > 1:
        raise TrainError(
            "the V3.2 indexer loss runs on one process for now; under torchrun pass "
            "--indexer-loss-weight 0 (the indexers stay as the warm-up left them)"
        )
    return weight


def check_v4(model: Transformer | V4Transformer, tc: TrainConfig, rt: Runtime) -> None:
    """What a V4 model cannot do yet is an error, not a silent no-op: train on several
    processes (FSDP2 / EP in parallel.py know V3's modules, not V4's stacked experts and
    hyper-connections) or take the sequence-wise balance loss (--alpha)."""
    if not isinstance(model, V4Transformer):
        return
    if rt.world > 1:
        raise TrainError(
            "DeepSeek-V4 presets train on one process for now (FSDP/EP do not shard V4's "
            "modules yet); run `nanoseek train` without torchrun"
        )
    if tc.alpha > 0:
        raise TrainError(
            "--alpha: DeepSeek-V4 has no sequence-wise balance loss here yet (its routers "
            "are balanced by the expert bias alone); pass --alpha 0"
        )


def start_run_files(
    tc: TrainConfig,
    rt: Runtime,
    model: Transformer | V4Transformer,
    out: Path,
) -> None:
    """Rank 0: the run directory's config.json and train_config.json, and the opening line."""
    cfg = model.config
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.json")
    atomic_write_text(out / "train_config.json", json.dumps(tc.to_dict(), indent=2) + "\n")
    print(
        f"training {tc.preset} ({human(model.num_params())} parameters, vocab "
        f"{cfg.vocab_size}) on {rt.device} {str(rt.dtype)[6:]}{allocator_note(rt.device)}, "
        f"{rt.world} process(es), "
        f"{batch_line(tc)} -> {out}",
        file=sys.stderr,
    )


def batch_line(tc: TrainConfig) -> str:
    """The opening line's batch: '8,192 tokens/step', or the ramp's start, end and length."""
    per_sequence = tc.seq_len * tc.grad_accum
    full = f"{tc.batch_size * per_sequence:,} tokens/step"
    if not tc.batch_ramp:
        return full
    return f"{tc.batch_start * per_sequence:,} growing to {full} over {tc.batch_ramp:.3g} tokens"


def accumulate_gradients(
    step_model: torch.nn.Module,
    model: Transformer | V4Transformer,
    loader: BatchLoader,
    step: int,
    batch: int,
    tc: TrainConfig,
    rt: Runtime,
    indexer_weight: float,
    counts: torch.Tensor,
    losses: torch.Tensor,
) -> None:
    """Forward and backward over the step's micro-batches of `batch` sequences (gradients
    synced on the last); `counts` and `losses` are reset and filled with this rank's expert
    loads and mean losses."""
    counts.zero_()
    losses.zero_()
    for micro in range(tc.grad_accum):
        x, y = loader.get_batch(step * tc.grad_accum + micro, batch)
        x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
        with rt.sync_grads(step_model, sync=micro == tc.grad_accum - 1):
            with rt.autocast():
                o = step_model(x, targets=y, mtp_weight=tc.mtp_weight, balance_weight=tc.alpha)
                kl = indexer_loss(model, x) if indexer_weight else None
            objective = o.loss if kl is None else o.loss + indexer_weight * kl
            (objective / tc.grad_accum).backward()
        losses += step_losses(o, objective, kl) / tc.grad_accum
        if o.expert_counts is not None:
            counts += o.expert_counts


def indexer_loss(model: Transformer | V4Transformer, x: torch.Tensor) -> torch.Tensor:
    """The indexers' KL to the main attention over what they select (V3.2: tokens; V4:
    CSA's compressed entries), added to the loss beside the LM loss."""
    if isinstance(model, V4Transformer):
        return indexer_kl_v4(model, x)
    return indexer_kl(model, x, sparse=True)


def warm_up_indexers(model: Transformer, loader: BatchLoader, tc: TrainConfig, rt: Runtime) -> list:
    """DeepSeek-V3.2's dense warm-up, before the first step of a fresh run: only the lightning
    indexers learn, by KL from the dense attention's distribution to theirs, on the run's
    first batches; the rest of the model is frozen. -> the KL of each step. Training then
    runs sparse; the indexers stay as the warm-up left them (the report goes on training
    them beside the LM loss: not done here)."""
    from nanoseek.model.indexer import indexer_kl, indexer_parameters

    params = indexer_parameters(model)
    if isinstance(model, V4Transformer):
        raise TrainError(
            "--indexer-warmup-steps is V3.2's dense warm-up; V4's CSA indexers learn beside "
            "the LM loss (--indexer-loss-weight)"
        )
    if not params:
        raise TrainError("--indexer-warmup-steps: the model has no indexer (a V3.2 preset has)")
    if rt.world > 1:
        raise TrainError("--indexer-warmup-steps runs on one process for now")
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=(tc.beta1, tc.beta2), weight_decay=0.0)
    kls = []
    for step in range(tc.indexer_warmup_steps):
        x, _ = loader.get_batch(10**12 + step)  # batches the training steps never draw
        with rt.autocast():
            kl = indexer_kl(model, x.to(rt.device))
        kl.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        kls.append(kl.item())
    print(
        f"indexer warm-up: {len(kls)} steps, KL to dense attention {kls[0]:.4f} -> {kls[-1]:.4f}",
        file=sys.stderr,
    )
    return kls


def step_losses(o: Any, total: torch.Tensor, kl: torch.Tensor | None) -> torch.Tensor:
    """[total, main, mean MTP, indexer KL] of one forward, detached: what is minimised (main +
    MTP + balance + the V3.2 indexers' KL) and its parts, logged apart."""
    mtp = torch.stack(o.mtp_losses).mean() if o.mtp_losses else torch.zeros_like(o.main_loss)
    kl = torch.zeros_like(o.main_loss) if kl is None else kl
    return torch.stack([total, o.main_loss, mtp, kl]).detach().float()


def new_model(
    tc: TrainConfig, vocab_size: int, device: torch.device
) -> Transformer | V4Transformer:
    """The preset's model, fresh (seeded): a V4Transformer for a V4 preset (tiny-v4)."""
    cfg = get_preset(tc.preset).replace(**tc.model)
    if cfg.vocab_size != vocab_size:  # the model's vocabulary is the tokenizer's
        cfg = cfg.replace(vocab_size=vocab_size)
    if cfg.max_position_embeddings < tc.seq_len:
        cfg = cfg.replace(max_position_embeddings=tc.seq_len)
    torch.manual_seed(tc.seed)
    build = V4Transformer if isinstance(cfg, V4Config) else Transformer
    return build(cfg).to(device)


def prepare_data(tc: TrainConfig, rt: Runtime) -> Path:
    """A shard directory as is; anything else is a corpus, prepared (once) into data_dir."""
    p = Path(tc.data).expanduser()
    if (p / "meta.json").is_file():
        return p
    out = Path(tc.data_dir) if tc.data_dir else Path(tc.out) / "data"
    if rt.world == 1:
        return prepare(tc.data, out, vocab_size=tc.vocab_size, verbose=True)
    # Rank 0 prepares; the others wait, then read it (all at once would race on the files).
    error = None
    if rt.master:
        try:
            prepare(tc.data, out, vocab_size=tc.vocab_size, verbose=True)
        except Exception as e:  # reach the barrier anyway, or the other ranks hang in it
            error = e
    rt.barrier()
    if error is not None:
        raise error
    if not (out / "meta.json").is_file():
        raise TrainError(f"rank 0 could not prepare {tc.data} into {out} (see its error)")
    return out
