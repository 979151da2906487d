"""Reinforcement learning on verifiable rewards (GRPO, the DeepSeek-R1 recipe): the
pretraining loop's other sibling.

One step:
1. rollouts: `prompts_per_step` training problems (a pure function of (seed, step, rank)),
   G completions each, sampled by nanoseek's own Engine from the policy being trained,
   all P * G at once (continuous batching), every completion with its own seed;
2. rewards from the task's verifier (correct + 0.1 x formatted), advantages normalised
   within each group (`grpo.group_advantages`);
3. `updates_per_batch` optimizer steps on the clipped objective (`grpo.policy_loss`), each
   on one of `minibatches` shuffled parts of the batch (PPO-style epochs when there are more
   updates than parts), the ratio taken to the sampling policy's log-probs; with beta > 0 a
   k3 KL to a frozen reference copy of the starting model;
4. after each optimizer step, `engine.refresh_weights()`: the next rollouts sample from the
   updated weights, in memory (no reload from disk).

With `async_rollouts` step 1 runs in a process of its own (`rollout_worker.py`), one step
ahead: while the trainer does steps 2-3 on step t's rollouts, the sampler draws step
t + 1's from the weights published before (one update stale), and the ratio is to the
log-probs it drew them with.

Everything else is shared with pretraining and SFT: the Runtime, the budget, checkpoints
with exact resume (a resumed run draws the same prompts and samples, so its metrics repeat
the uninterrupted run's), metrics.jsonl and the progress bar. Held-out accuracy is measured
every `eval_every` steps (and before the first); rl.png plots reward and held-out accuracy
against steps and seconds.

    nanoseek rl runs/sft --task arithmetic --out runs/rl --steps 200
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanoseek.data.tokenizer import Tokenizer
from nanoseek.device import allocator_note
from nanoseek.infer import Engine, SamplingParams
from nanoseek.model import Transformer
from nanoseek.posttrain.errors import PostTrainError
from nanoseek.posttrain.evaluate import chat_prompt, checkpoint_dir, evaluate_task, load_model
from nanoseek.posttrain.grpo import (
    VARIANTS,
    GRPOConfig,
    group_advantages,
    informative_groups,
    mask_truncated,
    overlong_penalty,
    policy_loss,
)
from nanoseek.posttrain.rollout_worker import RolloutWorker
from nanoseek.posttrain.sft import load_start
from nanoseek.posttrain.tasks import TASKS, Task, get_task
from nanoseek.train.checkpoint import (
    RunState,
    read_extra_tensors,
    restore_optimizer,
    restore_rng,
    save_checkpoint,
)
from nanoseek.train.config import RunConfig
from nanoseek.train.metrics import Progress, read_metrics
from nanoseek.train.run import (
    StepGuard,
    apply_update,
    build_kernels,
    build_optimizer,
    end_of_step,
    open_run,
    set_lr,
    tick,
)
from nanoseek.train.runtime import Runtime
from nanoseek.train.schedule import LRSchedule
from nanoseek.utils import atomic_path, atomic_write_text, format_table, human


def _h(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class RLConfig(RunConfig):
    init: str = _h(
        "the starting checkpoint (an SFT'd model): a checkpoint or run directory", default=""
    )
    task: str = _h(
        f"the task whose verifier gives the rewards: {', '.join(TASKS)}", default="arithmetic"
    )
    task_options: dict[str, Any] = _h(
        "the task's settings, e.g. {max_digits = 4} (config file only)", default_factory=dict
    )
    out: str = _h("run directory: ckpt/, metrics.jsonl, rl.png, summary.json", default="")
    # budget: the first reached stops the run
    steps: int | None = _h("GRPO steps (rollout batches)", default=None)
    tokens: float | None = _h("sampled completion tokens", default=None)
    minutes: float | None = _h("wall-clock minutes", default=None)
    # rollouts
    prompts_per_step: int = _h("problems per step (per rank)", default=16)
    group_size: int = _h("completions per problem (G)", default=8)
    temperature: float = _h("sampling temperature of the rollouts", default=1.0)
    max_completion_tokens: int = _h("tokens per completion at most", default=128)
    # the objective
    variant: str = _h(
        "grpo (DeepSeekMath: std-normalised advantages, per-sequence mean), dr_grpo (no std, "
        "constant divisor: no length bias), dapo (per-token mean, clip-higher, truncated "
        "completions masked)",
        default="dr_grpo",
    )
    beta: float | None = _h(
        "KL weight to the starting model (default: the variant's, 0.04 for grpo, 0 for "
        "dr_grpo and dapo; 0 skips the reference model)",
        default=None,
    )
    epsilon: float = _h("clip range below 1 (and above, unless --epsilon-high)", default=0.2)
    epsilon_high: float | None = _h("clip range above 1 (default: the variant's)", default=None)
    mask_truncated: bool | None = _h(
        "leave completions cut at --max-completion-tokens out of the loss (default: the "
        "variant's, on for dapo)",
        default=None,
    )
    overlong_cache: int = _h(
        "DAPO's soft overlong penalty over the last N tokens (0: off)", default=0
    )
    dynamic_sampling: int = _h(
        "DAPO's dynamic sampling: up to N more rounds of new problems per step to replace "
        "groups whose rewards are all equal (they carry no signal); 0: off",
        default=0,
    )
    updates_per_batch: int = _h(
        "optimizer steps per batch of rollouts (the ratio is to the sampling policy)", default=1
    )
    minibatches: int = _h(
        "parts each pass over the batch is split into; more updates than parts make "
        "PPO-style epochs",
        default=1,
    )
    async_rollouts: bool = _h(
        "sample the next step's rollouts in a process of their own (one CPU thread) while "
        "this one updates on the current step's: rollouts one update stale, the ratio taken "
        "to the sampler's log-probs (CPU, one process; --threads then counts the trainer's, "
        "by default all cores but the sampler's)",
        default=False,
    )
    # optimizer
    lr: float = _h(
        "learning rate (3e-5 measured best for the ~1M-parameter r1 model; 3e-4 wrecked it "
        "in 5 steps; models pretrained at scale want ~1e-6)",
        default=3e-5,
    )
    warmup_steps: int = _h("linear warm-up steps", default=0)
    min_lr_ratio: float = _h("final LR as a fraction of the peak (cosine)", default=1.0)
    weight_decay: float = _h("AdamW weight decay (matrices only)", default=0.0)
    beta1: float = _h("AdamW beta1", default=0.9)
    beta2: float = _h("AdamW beta2", default=0.99)
    grad_clip: float = _h("clip the gradient norm to this (0: off)", default=1.0)
    # evaluation, checkpoints, logging
    eval_every: int = _h("held-out accuracy every N steps (0: only before and after)", default=25)
    eval_n: int = _h("held-out problems per evaluation", default=100)
    save_every: int = _h("checkpoint every N steps (0: only at the end)", default=50)
    log_every: int = _h("write metrics every N steps", default=1)
    max_bad_steps: int = _h("stop after this many non-finite losses in a row", default=5)
    # machine
    seed: int = _h("random seed (prompts, samples, minibatches)", default=0)
    device: str = _h("auto, cpu, cuda, cuda:1, ...", default="auto")
    dtype: str = _h("auto (bf16 where the hardware has it), bf16 or fp32", default="auto")
    threads: int | None = _h("CPU threads (default: torch's choice)", default=None)
    resume: bool = _h(
        "continue from OUT/ckpt exactly where it stopped, with the run's saved settings; "
        "flags may change the budget, cadence and the machine, not what the run computes",
        default=False,
    )
    overwrite: bool = _h("start afresh even if OUT already holds a checkpoint", default=False)
    progress: bool = _h("show a progress bar", default=True)
    given: frozenset[str] | None = field(default=None, init=False, repr=False, compare=False)

    IDENTITY = (
        "init",
        "task",
        "task_options",
        "prompts_per_step",
        "group_size",
        "temperature",
        "max_completion_tokens",
        "variant",
        "beta",
        "epsilon",
        "epsilon_high",
        "mask_truncated",
        "overlong_cache",
        "dynamic_sampling",
        "updates_per_batch",
        "minibatches",
        "async_rollouts",
        "lr",
        "warmup_steps",
        "min_lr_ratio",
        "weight_decay",
        "beta1",
        "beta2",
        "seed",
    )

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise PostTrainError(f"rl: {msg}")

        need(bool(self.init) or self.resume, "give the starting checkpoint")
        need(bool(self.out), "give the run directory: --out DIR")
        need(self.task in TASKS, f"unknown task {self.task!r}; choose one of: {', '.join(TASKS)}")
        need(self.variant in VARIANTS, f"--variant must be one of {', '.join(VARIANTS)}")
        need(
            self.group_size >= 2,
            f"--group-size must be >= 2 (got {self.group_size}): the "
            "advantage compares completions of one prompt",
        )
        for name in (
            "prompts_per_step",
            "max_completion_tokens",
            "updates_per_batch",
            "minibatches",
            "eval_n",
        ):
            need(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1")
        need(
            self.updates_per_batch % self.minibatches == 0
            and self.prompts_per_step * self.group_size >= self.minibatches,
            "--updates-per-batch must be a multiple of --minibatches (whole passes over the "
            "batch), and --minibatches at most the completions per step",
        )
        need(self.dynamic_sampling >= 0, "--dynamic-sampling must be >= 0 (rounds)")
        need(
            not self.async_rollouts or self.device in ("auto", "cpu"),
            "--async-rollouts runs the sampler on a CPU core of its own; on a GPU leave it off",
        )
        need(self.temperature > 0, f"--temperature must be > 0, got {self.temperature}")
        need(self.lr > 0, f"--lr must be positive, got {self.lr}")
        need(0 <= self.min_lr_ratio <= 1, "--min-lr-ratio must be in [0, 1]")
        need(
            self.dtype in ("auto", "bf16", "fp32"),
            f"--dtype auto, bf16 or fp32, not {self.dtype!r}",
        )
        need(
            self.resume or any(v is not None for v in (self.steps, self.tokens, self.minutes)),
            "give a budget: --steps, --tokens or --minutes",
        )
        for name in ("steps", "tokens", "minutes"):
            v = getattr(self, name)
            need(v is None or v > 0, f"--{name} must be positive, got {v}")
        need(not (self.resume and self.overwrite), "--resume and --overwrite exclude each other")
        self.loss_config()  # its own checks: beta, epsilon, overlong cache

    def loss_config(self) -> GRPOConfig:
        """The variant's recommended settings, with what was given on top."""
        g = GRPOConfig.for_variant(self.variant)
        g.epsilon = self.epsilon
        for name in ("beta", "epsilon_high", "mask_truncated"):
            if getattr(self, name) is not None:
                setattr(g, name, getattr(self, name))
        g.overlong_cache = self.overlong_cache
        g.__post_init__()
        if g.overlong_cache > self.max_completion_tokens:
            raise PostTrainError("rl: --overlong-cache exceeds --max-completion-tokens")
        return g


# --- rollouts -----------------------------------------------------------------------------------
def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from (run seed, step, rank, index, ...): the same on every resume."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class Rollouts:
    """One step's completions, each prompt's G adjacent: every one sampled (the statistics)
    and, as `batch`, the rows the update trains on (all of them unless dynamic sampling
    replaced groups that carry no signal)."""

    ids: torch.Tensor  # [N, T] prompt + completion (+ the end token when it stopped), padded
    mask: torch.Tensor  # [N, T - 1] 1 where the target ids[:, t + 1] is a completion token
    rewards: torch.Tensor  # [N] total reward (with the overlong penalty, if any)
    correct: torch.Tensor  # [N]
    formatted: torch.Tensor  # [N]
    lengths: torch.Tensor  # [N] completion tokens, stop token excluded
    truncated: torch.Tensor  # [N] bool: cut at max_completion_tokens
    batch: torch.Tensor  # [P * G] the training rows: P groups, informative ones preferred
    # [N, T - 1] log-probs the sampler drew the completion tokens with (async rollouts)
    behaviour_logp: torch.Tensor | None = None


def sample_groups(
    engine: Engine,
    tokenizer: Tokenizer,
    task: Task,
    cfg: RLConfig,
    n: int,
    *where: Any,
) -> tuple[list[list[int]], list[Any], list[Any]]:
    """n problems drawn from a seed derived from `where` (step, rank, round), G completions
    each: -> (prompt ids per completion, completions, rewards)."""
    problems = task.generate(1 + derive_seed(cfg.seed, "prompts", *where), n)
    prompts = [chat_prompt(tokenizer, p) for p in problems]
    G = cfg.group_size
    flat = [p for p in prompts for _ in range(G)]
    # The turn ends at <|end|> only (<|eos|> is not a chat token): a completion that
    # stopped ended with exactly that token, which the loss then trains on.
    params = [
        SamplingParams(
            max_tokens=cfg.max_completion_tokens,
            temperature=cfg.temperature,
            seed=derive_seed(cfg.seed, "sample", *where, i),
            stop_token_ids=[tokenizer.end_id],
            ignore_eos=True,
            # async: the behaviour policy's log-probs for the importance ratio
            logprobs=cfg.async_rollouts,
            logprobs_mode="sampled",
        )
        for i in range(len(flat))
    ]
    outs = engine.generate(flat, params)
    rewards = [task.reward(problems[i // G], c.text) for i, c in enumerate(outs)]
    return flat, outs, rewards


def rollout(
    engine: Engine,
    tokenizer: Tokenizer,
    task: Task,
    cfg: RLConfig,
    step: int,
    rank: int,
) -> tuple[Rollouts, list[str]]:
    """Sample G completions for each of the step's problems and score them. With dynamic
    sampling (DAPO), up to `dynamic_sampling` more rounds draw new problems for the groups
    whose rewards were all equal; the batch keeps P groups, informative ones preferred."""
    G, P = cfg.group_size, cfg.prompts_per_step
    flat, outs, rewards = sample_groups(engine, tokenizer, task, cfg, P, step, rank)
    informative = informative_groups(torch.tensor([r.total for r in rewards]), G).tolist()
    for rnd in range(1, 1 + cfg.dynamic_sampling):
        missing = P - sum(informative)
        if missing == 0:
            break
        more = sample_groups(engine, tokenizer, task, cfg, missing, step, rank, rnd)
        flat, outs, rewards = flat + more[0], outs + more[1], rewards + more[2]
        informative += informative_groups(torch.tensor([r.total for r in more[2]]), G).tolist()
    groups = sorted(range(len(informative)), key=lambda g: not informative[g])[:P]
    batch = torch.tensor([g * G + j for g in sorted(groups) for j in range(G)])
    seqs = [
        p + c.token_ids + ([tokenizer.end_id] if c.finish_reason == "stop" else [])
        for p, c in zip(flat, outs, strict=True)
    ]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T - 1)
    for b, (s, p) in enumerate(zip(seqs, flat, strict=True)):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, len(p) - 1 : len(s) - 1] = 1  # targets at t + 1 in [len(p), len(s))
    behaviour = None
    if cfg.async_rollouts:  # aligned with mask: the stop token's last, when it stopped
        behaviour = torch.zeros(mask.shape)
        for b, (p, c) in enumerate(zip(flat, outs, strict=True)):
            lps = c.logprobs + ([c.stop_logprob] if c.finish_reason == "stop" else [])
            behaviour[b, len(p) - 1 : len(p) - 1 + len(lps)] = torch.tensor(lps)
    lengths = torch.tensor([len(c.token_ids) for c in outs])
    total = torch.tensor([r.total for r in rewards])
    g = cfg.loss_config()
    total = total + overlong_penalty(lengths, cfg.max_completion_tokens, g.overlong_cache)
    r = Rollouts(
        ids=ids,
        mask=mask,
        rewards=total,
        correct=torch.tensor([float(r.correct) for r in rewards]),
        formatted=torch.tensor([float(r.formatted) for r in rewards]),
        lengths=lengths,
        truncated=torch.tensor([c.finish_reason == "length" for c in outs]),
        batch=batch,
        behaviour_logp=behaviour,
    )
    return r, [c.text for c in outs]


def token_logprobs(
    model: torch.nn.Module,
    ids: torch.Tensor,
    rt: Runtime,
    temperature: float = 1.0,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(ids[:, t + 1] | ids[:, :t + 1]) [B, T - 1], and the policy's entropy at each
    position (nats) when asked. The policy is the one the rollouts sample from: the model's
    distribution at the sampling temperature. The logits come from the model's forward (no
    targets), so DDP sees the head used inside it."""
    with rt.autocast():
        logits = model(ids[:, :-1]).logits
    logp_all = (logits.float() / temperature).log_softmax(-1)
    logp = logp_all.gather(-1, ids[:, 1:, None])[..., 0]
    ent = None
    if entropy:
        with torch.no_grad():
            ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


def trimmed(
    ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' ids and completion mask, cut after their last completion token."""
    m = mask[rows]
    T = int(m.any(0).nonzero().max()) + 2 if m.any() else 2
    return ids[rows, :T], m[:, : T - 1]


def logprobs_of(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    useful: torch.Tensor,
    rt: Runtime,
    temperature: float,
) -> torch.Tensor:
    """[B, T - 1] log-probs of the sampled tokens in the useful rows (0 elsewhere)."""
    out = torch.zeros(mask.shape, device=ids.device)
    rows = useful.nonzero()[:, 0]
    if len(rows):
        x, _ = trimmed(ids, mask, rows)
        out[rows, : x.shape[1] - 1] = token_logprobs(model, x, rt, temperature)[0]
    return out


def make_engine(model: Transformer, tokenizer: Tokenizer, task: Task, cfg: RLConfig) -> Engine:
    """The rollout engine over the policy itself (the same tensors: no copy), its context
    sized from the task's prompt lengths (deterministic, so a resumed run gets the same)."""
    probe = task.held_out(min(cfg.eval_n, task.held_out_max)) + task.generate(
        1 + derive_seed(cfg.seed, "probe"), 64
    )
    longest = max(len(chat_prompt(tokenizer, p)) for p in probe)
    need = longest + longest // 2 + cfg.max_completion_tokens
    max_len = min(need, model.config.max_position_embeddings)
    return Engine(
        model, tokenizer, max_batch=cfg.prompts_per_step * cfg.group_size, max_len=max_len
    )


# --- the loop -----------------------------------------------------------------------------------
class PolicyUpdate:
    """Step 3 of a GRPO step: `updates_per_batch` minibatch updates of the policy on one
    batch of rollouts (ids, completion mask, advantages), the engine (if it samples from
    this model) refreshed after each. The ratio is to the sampler's log-probs when given
    (async rollouts), else to the policy's own before the first update.
    -> the updates' mean loss, grad norm, KL, clip fraction and ratio; entropy; count."""

    def __init__(
        self,
        cfg: RLConfig,
        model: Transformer,
        step_model: torch.nn.Module,
        ref: Transformer | None,
        optimizer: torch.optim.Optimizer,
        engine: Engine | None,
        guard: StepGuard,
        rt: Runtime,
    ):
        self.cfg, self.loss_cfg = cfg, cfg.loss_config()
        self.model, self.step_model, self.ref = model, step_model, ref
        self.optimizer, self.engine, self.guard, self.rt = optimizer, engine, guard, rt

    def __call__(
        self,
        step: int,
        ids: torch.Tensor,
        mask: torch.Tensor,
        adv: torch.Tensor,
        behaviour_logp: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        cfg, loss_cfg, rt, ref = self.cfg, self.loss_cfg, self.rt, self.ref
        model, step_model, optimizer = self.model, self.step_model, self.optimizer
        # A completion whose advantage is 0 adds nothing to the policy
        # gradient (with beta 0, nothing at all): it is left out of the forward and
        # backward, while the divisors stay the whole batch's, so the update is the same.
        B, M = ids.shape[0], cfg.minibatches
        useful = mask.any(1) & ((adv != 0) | (ref is not None))
        old_logp, ref_logp = behaviour_logp, None  # of the sampling policy, the reference
        with torch.no_grad():
            if old_logp is None and cfg.updates_per_batch > 1:
                old_logp = logprobs_of(model, ids, mask, useful, rt, cfg.temperature)
            if ref is not None:
                ref_logp = logprobs_of(ref, ids, mask, useful, rt, cfg.temperature)
        sums = {"loss": 0.0, "grad_norm": 0.0, "kl": 0.0, "clip": 0.0, "ratio": 0.0}
        ent_sum, ent_n, updates = 0.0, 0.0, 0
        for u in range(cfg.updates_per_batch):
            epoch, part = divmod(u, M)
            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "mb", step, epoch))
            order = torch.randperm(B, generator=gen) if M > 1 else torch.arange(B)
            part_rows = order[part::M].to(rt.device)
            n_seq, n_tok = len(part_rows), rt.all_reduce_mean(mask[part_rows].sum().item())
            rows, scale = part_rows[useful[part_rows]], 1.0
            if len(rows) == 0:  # nothing to learn from
                if rt.world == 1:
                    continue  # no step: Adam would still move the weights
                rows, scale = part_rows[:1], 0.0  # every rank must join the all-reduce
            x, m = trimmed(ids, mask, rows)
            T1 = m.shape[1]
            logp, ent = token_logprobs(step_model, x, rt, cfg.temperature, entropy=epoch == 0)
            loss, st = policy_loss(
                logp,
                None if old_logp is None else old_logp[rows, :T1],
                None if ref_logp is None else ref_logp[rows, :T1],
                adv[rows],
                m,
                loss_cfg.variant,
                loss_cfg.beta,
                loss_cfg.epsilon,
                loss_cfg.epsilon_high,
                max_len=cfg.max_completion_tokens,
                normalizer=max(n_tok, 1.0) if cfg.variant == "dapo" else n_seq,
            )
            (loss * scale).backward()
            loss_v = rt.all_reduce_mean(loss.item() * scale)
            norm, _ = apply_update(model, optimizer, self.guard, rt, step, loss_v, cfg.grad_clip)
            if self.engine is not None:
                self.engine.refresh_weights()  # the next rollouts see the new weights
            updates += 1
            sums["loss"] += loss_v
            sums["grad_norm"] += norm
            sums["kl"] += st["kl"].item()
            sums["clip"] += (st["clip_low"] + st["clip_high"]).item()
            sums["ratio"] += st["ratio"].item()
            if ent is not None:
                ent_sum += (ent * m).sum().item()
                ent_n += m.sum().item()
        U = max(updates, 1)
        return {
            "loss": sums["loss"] / U,
            "grad_norm": sums["grad_norm"] / U,
            "kl": rt.all_reduce_mean(sums["kl"] / U) if ref is not None else None,
            "clip_frac": rt.all_reduce_mean(sums["clip"] / U),
            "ratio": rt.all_reduce_mean(sums["ratio"] / U),
            "entropy": rt.all_reduce_mean(ent_sum / ent_n) if ent_n else None,
            "updates": updates,
        }


def step_record(
    state: RunState, roll: Rollouts, upd: dict[str, Any], group_size: int, rt: Runtime
) -> dict[str, Any]:
    """One step's metrics line: the rollouts' statistics (mean over ranks, over everything
    sampled: the policy's own reward, not the filtered batch's) and the updates'."""
    stats = torch.tensor(
        [
            roll.rewards.mean(),
            roll.correct.mean(),
            roll.formatted.mean(),
            roll.lengths.float().mean(),
            roll.truncated.float().mean(),
            informative_groups(roll.rewards, group_size).float().mean(),
        ],
        dtype=torch.float64,
    )
    reward, acc, fmt, length, trunc, informative = rt.all_reduce_mean(stats).tolist()
    return {
        "step": state.step,
        "loss": upd["loss"],
        "reward": reward,
        "accuracy": acc,
        "format_rate": fmt,
        "response_len": length,
        "truncated": trunc,
        "informative_groups": informative,
        "completions": len(roll.rewards),
        "entropy": upd["entropy"],
        "updates": upd["updates"],
        "clip_frac": upd["clip_frac"],
        "ratio": upd["ratio"],
        "grad_norm": upd["grad_norm"],
        **({} if upd["kl"] is None else {"kl": upd["kl"]}),  # beta 0: no reference, no KL
        "sampled_tokens": state.tokens,
        "elapsed": state.elapsed,
    }


def load_policy(
    cfg: RLConfig, found: Path | None, rt: Runtime
) -> tuple[Transformer, Tokenizer, RunState, Any, Transformer | None]:
    """-> (policy, tokenizer, run state, saved RNG state or None, frozen reference or None):
    from the run's checkpoint on --resume, else from cfg.init; the reference (the starting
    model) only when beta > 0."""
    model, tokenizer, state, rng = load_start(cfg, found, rt)
    state.train_config = cfg.to_dict()
    ref = None
    if cfg.loss_config().beta > 0:  # the starting model, frozen
        try:
            ref, _ = load_model(cfg.init, rt.device, torch.float32)
        except (ValueError, OSError) as e:
            raise PostTrainError(
                f"the reference model (the starting checkpoint {cfg.init}) cannot be loaded: {e}"
            ) from e
        ref.requires_grad_(False)
    return model, tokenizer, state, rng, ref


def rl(cfg: RLConfig) -> dict[str, Any]:
    cfg.validate()
    cfg, found = open_run(cfg)  # on --resume: the run's saved settings, and its checkpoint
    out, ckpt_dir = Path(cfg.out), Path(cfg.out) / "ckpt"
    task = get_task(cfg.task, **cfg.task_options)
    # DDP: the rollout engine reads the policy's whole tensors
    threads = cfg.threads
    if cfg.async_rollouts and threads is None:  # one core samples, the others train
        threads = max(1, torch.get_num_threads() - 1)
    with (
        Runtime.start(cfg.device, cfg.dtype, threads, parallel="ddp") as rt,
        contextlib.ExitStack() as stack,
    ):
        # --- policy, reference, optimizer, engine ---------------------------------------------
        source = found or checkpoint_dir(cfg.init)  # of the tokenizer (fresh: the weights)
        model, tokenizer, state, rng, ref = load_policy(cfg, found, rt)
        # The expert biases stay as they are: moving them would change the policy outside
        # the clipped objective, and RL batches are too small to measure load from.
        model.train()
        step_model = rt.wrap(model, unused_parameters=True)  # the MTP modules get no gradient
        optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
        if found:
            restore_optimizer(found, model, optimizer)
            restore_rng(rng)
        engine = worker = None
        if cfg.async_rollouts:  # the sampler in its own process, one step ahead
            if rt.world > 1:
                raise PostTrainError("rl: --async-rollouts runs on one process, not torchrun")
            sampler = read_extra_tensors(found, "sampler") if found else None
            worker = stack.enter_context(RolloutWorker(model, tokenizer, task, cfg, 1, sampler))
            worker.submit(state.step)
        else:
            engine = make_engine(model, tokenizer, task, cfg)
        if rt.master:
            announce(cfg, model, task, rt)

        def held_out() -> dict[str, float]:
            return held_out_accuracy(model, tokenizer, task, cfg, state, rt)

        def save() -> None:  # every rank: a collective
            # async: the weights the rollouts in flight sample from, so a resume repeats them
            extra = {"sampler": worker.state()} if worker else None
            save_checkpoint(ckpt_dir, model, optimizer, state, source, extra)

        # --- the loop --------------------------------------------------------------------------
        stop, horizon = cfg.budget(), state.lr_horizon
        schedule = LRSchedule(cfg.lr, cfg.warmup_steps, "cosine", cfg.min_lr_ratio)
        guard = StepGuard(cfg.max_bad_steps, ckpt_dir, warn=rt.master)
        update = PolicyUpdate(cfg, model, step_model, ref, optimizer, engine, guard, rt)
        build_kernels(rt)  # a first run's kernel compile, before the clock
        t_start = time.perf_counter() - state.elapsed
        progress = Progress(
            out / "metrics.jsonl",
            rt.master,
            cfg.progress,
            cfg.steps,
            state.step if found else None,
            cfg.log_every,
            show={"reward": ".2f", "accuracy": ".0%", "val_accuracy": ".0%", "response_len": ".0f"},
        )
        every = (cfg.eval_every, cfg.save_every)  # evaluate / checkpoint cadence
        with progress:
            if not found:  # where the run starts from
                first = held_out()
                state.elapsed = time.perf_counter() - t_start
                if progress.log is not None:
                    progress.log.write({"step": 0, **first, "elapsed": state.elapsed})
            while state.progress(stop) < 1.0:
                step, t0 = state.step, time.perf_counter()
                lr = set_lr(optimizer, schedule(step, state.progress(horizon)))
                if worker is None:
                    roll = rollout(engine, tokenizer, task, cfg, step, rt.rank)[0]
                    t_roll = time.perf_counter()
                    sampled_s = t_roll - t0
                else:  # this step's rollouts; then the next step's start from these weights
                    roll, sampled_s = worker.result()
                    t_roll = time.perf_counter()
                    worker.publish(model)
                    worker.submit(step + 1)
                upd = learn(cfg, roll, update, step, rt)
                t_end = time.perf_counter()
                state.step += 1
                state.tokens += int(rt.all_reduce_sum(float(roll.lengths.sum())))
                for key, secs in (
                    ("rollout_seconds", sampled_s),
                    ("rollout_wait_seconds", t_roll - t0),
                    ("update_seconds", t_end - t_roll),
                ):
                    state.extra[key] = state.extra.get(key, 0.0) + secs
                tick(state, t0, t_start, rt, stop, horizon)

                # --- metrics, evaluation, checkpoints ------------------------------------------
                rec = step_record(state, roll, upd, cfg.group_size, rt)
                rec.update(
                    lr=lr, rollout_s=sampled_s, update_s=t_end - t_roll, train_s=state.train_seconds
                )
                if worker is not None:
                    rec["rollout_wait_s"] = t_roll - t0
                end_of_step(state, stop, rec, progress, guard, every, held_out, save)

        # --- summary ---------------------------------------------------------------------------
        if not rt.master:
            return {}
        return finish(cfg, state, task, rt)


def announce(cfg: RLConfig, model: Transformer, task: Task, rt: Runtime) -> None:
    """rl_config.json and the run's one-line banner (rank 0)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "rl_config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    print(
        f"rl ({cfg.variant}, beta {cfg.loss_config().beta:g}) {cfg.init} "
        f"({human(model.num_params())} parameters) on {task.name}: "
        f"{cfg.prompts_per_step} x {cfg.group_size} completions per step, "
        f"{cfg.updates_per_batch} update(s), {rt.device} {str(rt.dtype)[6:]}"
        f"{allocator_note(rt.device)}, "
        f"{rt.world} process(es) -> {out}",
        file=sys.stderr,
    )


def held_out_accuracy(
    model: Transformer,
    tokenizer: Tokenizer,
    task: Task,
    cfg: RLConfig,
    state: RunState,
    rt: Runtime,
) -> dict[str, float]:
    """Greedy accuracy on the task's held-out set (rank 0; the others wait), its seconds
    added to the run's evaluation time."""
    t0 = time.perf_counter()
    rec = {}
    if rt.master:
        r = evaluate_task(
            model,
            tokenizer,
            task,
            n=cfg.eval_n,
            max_tokens=cfg.max_completion_tokens,
            max_batch=min(cfg.eval_n, 64),
        )
        rec = {"val_accuracy": r.accuracy, "val_format": r.format_rate, "val_length": r.mean_length}
    rt.barrier()
    state.extra["eval_seconds"] = state.extra.get("eval_seconds", 0.0) + (time.perf_counter() - t0)
    return rec


def learn(
    cfg: RLConfig, roll: Rollouts, update: PolicyUpdate, step: int, rt: Runtime
) -> dict[str, Any]:
    """Advantages within each group, then the updates on the batch's rows -> the updates'
    statistics."""
    loss_cfg = cfg.loss_config()
    rows = roll.batch
    adv = group_advantages(roll.rewards[rows], cfg.group_size, loss_cfg.scale_std)
    mask = roll.mask[rows]
    if loss_cfg.mask_truncated:
        mask = mask_truncated(mask, roll.truncated[rows])
    behaviour = None if roll.behaviour_logp is None else roll.behaviour_logp[rows].to(rt.device)
    return update(
        step, roll.ids[rows].to(rt.device), mask.to(rt.device), adv.to(rt.device), behaviour
    )


def finish(cfg: RLConfig, state: RunState, task: Task, rt: Runtime) -> dict[str, Any]:
    """summary.json, rl.png and the summary table (rank 0)."""
    out = Path(cfg.out)
    summary = summarize(cfg, state, out / "metrics.jsonl", rt)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    title = f"{cfg.variant} on {task.name} from {cfg.init}"
    plot_rl(out / "metrics.jsonl", out / "rl.png", title)
    print(summary_table(summary), file=sys.stderr)
    return summary


def summarize(cfg: RLConfig, state: RunState, metrics: Path, rt: Runtime) -> dict[str, Any]:
    recs = read_metrics(metrics)
    evals = [r for r in recs if r.get("val_accuracy") is not None]
    steps = [r for r in recs if r.get("reward") is not None]
    window = max(1, min(10, len(steps) // 4))

    def mean(key: str, rs: list[dict]) -> float | None:
        vals = [r[key] for r in rs if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    ex = state.extra
    return {
        "init": cfg.init,
        "task": cfg.task,
        "variant": cfg.variant,
        "beta": cfg.loss_config().beta,
        "steps": state.step,
        "completions": state.step * cfg.prompts_per_step * cfg.group_size * rt.world,
        "sampled_tokens": state.tokens,
        "held_out_n": cfg.eval_n,
        "held_out_accuracy_start": evals[0]["val_accuracy"] if evals else None,
        "held_out_accuracy_end": evals[-1]["val_accuracy"] if evals else None,
        "held_out_format_end": evals[-1].get("val_format") if evals else None,
        "reward_start": mean("reward", steps[:window]),
        "reward_end": mean("reward", steps[-window:]),
        "async_rollouts": cfg.async_rollouts,
        "rollout_seconds": ex.get("rollout_seconds", 0.0),
        "rollout_wait_seconds": ex.get("rollout_wait_seconds", ex.get("rollout_seconds", 0.0)),
        "update_seconds": ex.get("update_seconds", 0.0),
        "eval_seconds": ex.get("eval_seconds", 0.0),
        "elapsed_seconds": state.elapsed,
        "device": str(rt.device),
        "world_size": rt.world,
        "checkpoint": str(Path(cfg.out) / "ckpt"),
    }


def summary_table(s: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    busy = max(s["rollout_seconds"] + s["update_seconds"], 1e-9)
    rollouts = f"rollouts {s['rollout_seconds']:.0f} s ({s['rollout_seconds'] / busy:.0%})"
    if s.get("async_rollouts"):  # sampled meanwhile, in their own process
        rollouts = (
            f"rollouts {s['rollout_seconds']:.0f} s in their own process (the trainer "
            f"waited {s['rollout_wait_seconds']:.0f} s for them)"
        )
    rows = [
        ("run", f"{s['variant']} (beta {s['beta']:g}) on {s['task']} from {s['init']}"),
        (
            "trained",
            f"{s['steps']} steps, {s['completions']:,} completions, "
            f"{human(s['sampled_tokens'])} sampled tokens",
        ),
        (
            "held-out accuracy",
            f"{pct(s['held_out_accuracy_start'])} -> "
            f"{pct(s['held_out_accuracy_end'])} (n={s['held_out_n']})",
        ),
        ("mean reward", f"{num(s['reward_start'])} -> {num(s['reward_end'])}"),
        (
            "time",
            f"{rollouts}, updates {s['update_seconds']:.0f} s, "
            f"evaluation {s['eval_seconds']:.0f} s; {s['elapsed_seconds']:.0f} s in all",
        ),
        ("checkpoint", s["checkpoint"]),
    ]
    return format_table(rows, "\nrl summary")


def plot_rl(metrics_path: str | Path, png: str | Path, title: str = "") -> None:
    """Reward (per step and its running mean) and held-out accuracy, against steps (left)
    and wall seconds (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    recs = read_metrics(metrics_path)
    train = [(r["step"], r["elapsed"], r["reward"]) for r in recs if r.get("reward") is not None]
    evals = [
        (r["step"], r["elapsed"], r["val_accuracy"])
        for r in recs
        if r.get("val_accuracy") is not None
    ]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, col, label in ((axes[0], 0, "step"), (axes[1], 1, "seconds")):
        if train:
            a = np.array(train)
            ax.plot(a[:, col], a[:, 2], lw=0.8, alpha=0.35, color="C0", label="reward (per step)")
            w = max(1, len(a) // 20)
            if w > 1:
                smooth = np.convolve(a[:, 2], np.ones(w) / w, mode="valid")
                ax.plot(a[w - 1 :, col], smooth, color="C0", label=f"reward (mean of {w})")
        if evals:
            e = np.array(evals)
            ax.plot(e[:, col], e[:, 2], "o-", color="C1", label="held-out accuracy")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("reward / accuracy")
    axes[0].legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
