"""nanoseek's GRPO against TRL's `GRPOTrainer`, side by side: the same SFT checkpoint, task,
training problems (step for step), rewards, group size, loss and wall-clock budget; held-out
accuracy against training seconds for both.

    python -m benchmarks.grpo_trl --init runs/r1/sft --minutes 15 [--ours RUN_DIR]

TRL is a benchmark-only extra: `pip install -e '.[bench-trl]'`.

TRL side. The checkpoint (Hugging Face DeepSeek-V3 layout) opens in transformers as
`DeepseekV3ForCausalLM` (fp32); its tokenizer as a `PreTrainedTokenizerFast` with eos
`<|end|>` (a turn ends there, as in nanoseek's rl, and generation stops only there) and pad
`<|pad|>`. The prompts are the text of nanoseek's chat prompts (`chat_prompt`: thinking
prompts ending `<|assistant|><think>`), checked to tokenize to the same ids; the dataset
holds, in order and unshuffled, the 16 problems nanoseek's rl draws at each step, so both
sides train on the same problems at the same step. The reward is the task's verifier
(1 x correct + 0.1 x formatted) on the completion decoded by nanoseek's tokenizer, as
nanoseek's rl scores it. Settings (TRL 1.16 defaults in brackets where they differ):

    loss_type dr_grpo [dapo], scale_rewards none [group], beta 0 [0], epsilon 0.2,
    num_generations 8, 128 completions (16 prompts) per optimizer step, one update per
    batch (num_iterations 1, steps_per_generation 1), lr 3e-5 constant [1e-6, linear decay],
    AdamW betas (0.9, 0.99) [0.999], weight decay 0, grad clip 1.0, temperature 1.0, top_p 1,
    top_k off, max_completion_length 64 (r1.MAX_TOKENS) [512], fp32 [bf16],
    gradient checkpointing off [on], no vLLM, CPU, --threads threads.

Held-out accuracy: every --eval-seconds of training time the policy is written with
`save_pretrained` and scored by nanoseek's own `evaluate_task` (greedy, the same 200
held-out problems as nanoseek's rl), so both sides are measured identically. The clock
counts training only: evaluation time is subtracted (nanoseek's side is read the same way,
from its steps' own clock, `train_s`).

With --async-rollouts nanoseek samples in a process of its own on one of the --threads
cores while the trainer updates on the rest (`nanoseek rl --async-rollouts`): the same
cores as TRL's, the rollouts one update stale.

nanoseek side: `nanoseek.r1.rl_stage` for the same minutes and threads (its defaults are the
settings above; its budget counts its evaluations, ~2 s each, so it trains a little less), or
an existing run with --ours RUN_DIR (metrics.jsonl + summary.json). The table compares the
last evaluation of each side at or before TRL's training time.

Prints the table and saves docs/grpo_trl.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from nanoseek.train.metrics import read_metrics
from nanoseek.utils import format_table

PROMPTS_PER_STEP, GROUP_SIZE, LR, SEED = 16, 8, 3e-5, 0


# --- the TRL run ----------------------------------------------------------------------------
def trl_run(args: argparse.Namespace, init: Path, out: Path) -> dict[str, Any]:
    """GRPOTrainer from `init` for args.minutes of training time; returns the summary and
    writes out/metrics.jsonl (one row per step, held-out accuracy on some) and summary.json."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import (
        DeepseekV3ForCausalLM,
        PreTrainedTokenizerFast,
        PrinterCallback,
        TrainerCallback,
    )
    from trl import GRPOConfig, GRPOTrainer

    from nanoseek.data.tokenizer import END, PAD, Tokenizer
    from nanoseek.posttrain.evaluate import chat_prompt, evaluate_task, load_model
    from nanoseek.posttrain.rl import derive_seed
    from nanoseek.posttrain.tasks import Problem, get_task
    from nanoseek.r1 import MAX_TOKENS, TASK

    task = get_task(TASK)
    tok = Tokenizer.load(init)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_file=str(init / "tokenizer.json"), eos_token=END, pad_token=PAD
    )

    # The training problems, step by step as nanoseek's rl draws them (seed 0, rank 0).
    steps_max = args.max_steps
    rows: dict[str, list] = {"prompt": [], "question": [], "answer": []}
    mismatched = 0
    for step in range(steps_max):
        problems = task.generate(1 + derive_seed(SEED, "prompts", step, 0), PROMPTS_PER_STEP)
        for p in problems:
            ids = chat_prompt(tok, p)
            text = tok.decode(ids)
            if step < args.check_steps:  # what TRL will tokenize must be these ids
                mismatched += hf_tok(text=[text])["input_ids"][0] != ids
            rows["prompt"].append(text)
            rows["question"].append(p.prompt)
            rows["answer"].append(p.answer)
    checked = min(steps_max, args.check_steps) * PROMPTS_PER_STEP
    print(
        f"prompts: {checked:,} checked, {mismatched} tokenize differently in TRL "
        f"(e.g. {rows['prompt'][0]!r})",
        flush=True,
    )
    dataset = Dataset.from_dict(rows)

    model = DeepseekV3ForCausalLM.from_pretrained(str(init), dtype=torch.float32)
    model.generation_config.eos_token_id = tok.end_id  # not <|eos|>: as nanoseek's rl
    model.generation_config.pad_token_id = tok.pad_id
    model.generation_config.bos_token_id = tok.bos_id

    stats: dict[str, list[float]] = {"correct": [], "formatted": []}
    order = {"checked": 0, "mismatched": 0}
    handle: dict[str, Any] = {}  # the trainer, once built

    def verifier(completions, completion_ids, question, answer, **_: Any) -> list[float]:
        """The task's reward on the completion as nanoseek's rl decodes it: its tokens without
        the closing <|end|>, special tokens kept (TRL's text drops them)."""
        step = handle["trainer"].state.global_step  # the step these rollouts train
        want = rows["question"][PROMPTS_PER_STEP * step : PROMPTS_PER_STEP * (step + 1)]
        order["checked"] += 1
        order["mismatched"] += sorted(set(question)) != sorted(want)
        out = []
        for ids, q, a in zip(completion_ids, question, answer, strict=True):
            ids = ids[:-1] if ids and ids[-1] == tok.end_id else ids
            r = task.reward(Problem(q, a), tok.decode(ids))
            stats["correct"].append(float(r.correct))
            stats["formatted"].append(float(r.formatted))
            out.append(r.total)
        return out

    config = GRPOConfig(
        output_dir=str(out / "trl"),
        # the batch: 16 prompts x 8 completions, one optimizer step on all 128
        num_generations=GROUP_SIZE,
        per_device_train_batch_size=PROMPTS_PER_STEP * GROUP_SIZE,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        shuffle_dataset=False,  # row order = nanoseek's step order
        max_steps=steps_max,
        # the objective: Dr. GRPO, no KL, no std scaling
        loss_type="dr_grpo",
        scale_rewards="none",
        beta=0.0,
        epsilon=0.2,
        mask_truncated_completions=False,
        # sampling
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_completion_length=MAX_TOKENS,
        use_vllm=False,
        # optimizer: nanoseek's rl defaults
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        adam_beta1=0.9,
        adam_beta2=0.99,
        weight_decay=0.0,
        max_grad_norm=1.0,
        # machine
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        seed=SEED,
        # bookkeeping
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )

    timing = {"generate": 0.0, "generate_and_score": 0.0}

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer, unchanged, with timers around its rollouts: `_generate_single_turn`
        (transformers' generate) and `_generate_and_score_completions` (generate, decode,
        rewards, advantages, the batch's tensors)."""

        def _generate_single_turn(self, *a, **kw):
            t = time.perf_counter()
            try:
                return super()._generate_single_turn(*a, **kw)
            finally:
                timing["generate"] += time.perf_counter() - t

        def _generate_and_score_completions(self, *a, **kw):
            t = time.perf_counter()
            try:
                return super()._generate_and_score_completions(*a, **kw)
            finally:
                timing["generate_and_score"] += time.perf_counter() - t

    eval_n, budget = args.eval_n, 60 * args.minutes
    metrics_path = out / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)

    def held_out(policy: torch.nn.Module) -> dict[str, float]:
        """nanoseek's evaluate_task on the policy's weights, through a HF checkpoint."""
        with tempfile.TemporaryDirectory() as tmp:
            policy.save_pretrained(tmp)
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(init / name, Path(tmp) / name)
            ns_model, ns_tok = load_model(tmp)
        r = evaluate_task(
            ns_model, ns_tok, task, n=eval_n, max_tokens=MAX_TOKENS, max_batch=min(eval_n, 64)
        )
        return {
            "val_accuracy": r.accuracy,
            "val_format": r.format_rate,
            "val_length": r.mean_length,
        }

    class Clock(TrainerCallback):
        """Training seconds (evaluation excluded), held-out accuracy every --eval-seconds, the
        stop at --minutes, and one metrics row per step."""

        def __init__(self) -> None:
            self.t0 = 0.0
            self.eval_s = 0.0
            self.next_eval = args.eval_seconds
            self.row: dict[str, Any] = {}
            self.step_t0 = 0.0
            self.gen0 = self.gs0 = 0.0
            self.totals = {"generate": 0.0, "generate_and_score": 0.0, "step": 0.0}

        def train_seconds(self) -> float:
            return time.perf_counter() - self.t0 - self.eval_s

        def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
            t = time.perf_counter()
            rec = held_out(model)
            self.eval_s += time.perf_counter() - t
            rec["eval_s"] = time.perf_counter() - t
            return rec

        def write(self, rec: dict[str, Any]) -> None:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

        def on_train_begin(self, a, state, control, model=None, **kw):
            if torch.get_num_threads() != args.threads:
                print(f"warning: torch uses {torch.get_num_threads()} threads", file=sys.stderr)
            self.t0 = time.perf_counter()
            self.write({"step": 0, **self.evaluate(model), "elapsed": 0.0})

        def on_step_begin(self, a, state, control, **kw):
            self.step_t0 = time.perf_counter()
            self.gen0, self.gs0 = timing["generate"], timing["generate_and_score"]
            stats["correct"].clear()
            stats["formatted"].clear()

        def on_step_end(self, a, state, control, model=None, **kw):
            step_s = time.perf_counter() - self.step_t0
            gen = timing["generate"] - self.gen0
            gs = timing["generate_and_score"] - self.gs0
            self.totals["generate"] += gen
            self.totals["generate_and_score"] += gs
            self.totals["step"] += step_s
            elapsed = self.train_seconds()
            self.row = {
                "step": state.global_step,
                "accuracy": float(np.mean(stats["correct"])) if stats["correct"] else None,
                "format_rate": float(np.mean(stats["formatted"])) if stats["formatted"] else None,
                "step_s": step_s,
                "generate_s": gen,
                "rollout_s": gs,  # generate + decode + rewards + advantages
                "update_s": step_s - gs,  # forward, backward, optimizer step
                "elapsed": elapsed,
            }
            done = elapsed >= budget or state.global_step >= steps_max
            if elapsed >= self.next_eval or done:
                self.row.update(self.evaluate(model))
                while self.next_eval <= elapsed:
                    self.next_eval += args.eval_seconds
            if done:
                control.should_training_stop = True
                control.should_log = True
            return control

        def on_log(self, a, state, control, logs=None, **kw):
            if not self.row or logs is None:
                return
            keep = (
                "reward",
                "reward_std",
                "loss",
                "grad_norm",
                "entropy",
                "completions/mean_length",
                "completions/clipped_ratio",
                "frac_reward_zero_std",
                "step_time",
            )
            self.row.update({k: logs[k] for k in keep if k in logs})
            print(
                f"step {self.row['step']:4d}  {self.row['elapsed']:6.0f} s  "
                f"reward {self.row.get('reward', float('nan')):.3f}  "
                f"generate {self.row['generate_s']:.2f} s  update {self.row['update_s']:.2f} s"
                + (
                    f"  held-out {self.row['val_accuracy']:.1%}"
                    if "val_accuracy" in self.row
                    else ""
                ),
                flush=True,
            )
            self.write(self.row)
            self.row = {}

    clock = Clock()
    trainer = TimedGRPOTrainer(
        model=model,
        reward_funcs=verifier,
        args=config,
        train_dataset=dataset,
        processing_class=hf_tok,
        callbacks=[clock],
    )
    handle["trainer"] = trainer
    trainer.remove_callback(PrinterCallback)  # our own one-line log instead of its dicts
    if trainer.eos_token_ids != [tok.end_id]:
        raise RuntimeError(f"TRL stops at {trainer.eos_token_ids}, not only <|end|>")
    print(
        f"TRL {trl.__version__} GRPOTrainer: {config.loss_type}, beta {config.beta}, "
        f"scale_rewards {config.scale_rewards}, optimizer {config.optim}, experts "
        f"{model.config._experts_implementation}, attention {model.config._attn_implementation}, "
        f"{torch.get_num_threads()} thread(s)",
        flush=True,
    )
    trainer.train()

    recs = read_metrics(metrics_path)
    steps = [r for r in recs if r.get("step_s") is not None]
    evals = [r for r in recs if r.get("val_accuracy") is not None]
    t = clock.totals
    summary = {
        "side": "TRL",
        "trl_version": trl.__version__,
        "init": str(init),
        "steps": len(steps),
        "held_out_n": eval_n,
        "held_out_accuracy_start": evals[0]["val_accuracy"],
        "held_out_accuracy_end": evals[-1]["val_accuracy"],
        "train_seconds": steps[-1]["elapsed"] if steps else 0.0,
        "step_seconds": t["step"],
        "generate_seconds": t["generate"],
        "rollout_seconds": t["generate_and_score"],
        "update_seconds": t["step"] - t["generate_and_score"],
        "eval_seconds": clock.eval_s,
        "prompt_mismatches": mismatched,
        "prompts_checked": checked,
        "steps_with_other_problems": order["mismatched"],  # than nanoseek's rl at that step
        "settings": {
            k: getattr(config, k)
            for k in (
                "loss_type",
                "scale_rewards",
                "beta",
                "epsilon",
                "num_generations",
                "per_device_train_batch_size",
                "num_iterations",
                "learning_rate",
                "lr_scheduler_type",
                "adam_beta1",
                "adam_beta2",
                "weight_decay",
                "max_grad_norm",
                "optim",
                "temperature",
                "top_p",
                "top_k",
                "max_completion_length",
                "bf16",
                "gradient_checkpointing",
                "use_vllm",
            )
        },
    }
    summary["settings"]["optim"] = str(summary["settings"]["optim"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# --- where the time goes --------------------------------------------------------------------
def profile(init: Path, repeats: int = 5) -> None:
    """One step's work done both ways on the same weights and the same 16 x 8 prompts (step
    0's problems). Each measurement is the median of `repeats` rounds after a warm-up round;
    a round runs every measurement once, in turn, so that drift on a shared machine hits all
    of them alike.

    rollouts: nanoseek's Engine (continuous batching, latent MLA cache; a finished sequence
    leaves the batch) vs transformers' `generate` as TRL calls it (a left-padded static batch
    of 128 that runs until its last sequence stops; a DynamicCache of full keys/values);
    update: forward + backward of the rollouts' [128, T] ids through each implementation,
    all rows (TRL's step) and only the rows with a non-zero advantage (what nanoseek's step
    runs), and nanoseek's `engine.refresh_weights()` after each optimizer step."""
    import statistics

    import torch
    from transformers import DeepseekV3ForCausalLM, GenerationConfig

    from nanoseek.data.tokenizer import Tokenizer
    from nanoseek.infer import SamplingParams
    from nanoseek.posttrain.evaluate import chat_prompt, load_model
    from nanoseek.posttrain.grpo import group_advantages
    from nanoseek.posttrain.rl import RLConfig, derive_seed, make_engine
    from nanoseek.posttrain.tasks import get_task
    from nanoseek.r1 import MAX_TOKENS, TASK

    task, tok = get_task(TASK), Tokenizer.load(init)
    problems = task.generate(1 + derive_seed(SEED, "prompts", 0, 0), PROMPTS_PER_STEP)
    flat = [chat_prompt(tok, p) for p in problems for _ in range(GROUP_SIZE)]
    B = len(flat)
    ns, _ = load_model(init)
    cfg = RLConfig(init=str(init), out="-", steps=1, max_completion_tokens=MAX_TOKENS, eval_n=200)
    engine = make_engine(ns, tok, task, cfg)
    params = [
        SamplingParams(
            max_tokens=MAX_TOKENS,
            temperature=1.0,
            seed=i,
            stop_token_ids=[tok.end_id],
            ignore_eos=True,
        )
        for i in range(B)
    ]
    hf = DeepseekV3ForCausalLM.from_pretrained(str(init), dtype=torch.float32).eval()
    P = max(len(p) for p in flat)
    ids = torch.full((B, P), tok.pad_id)
    attn = torch.zeros(B, P, dtype=torch.long)
    for b, p in enumerate(flat):  # left padding, as TRL pads prompts
        ids[b, P - len(p) :], attn[b, P - len(p) :] = torch.tensor(p), 1
    gen_cfg = GenerationConfig(
        max_new_tokens=MAX_TOKENS,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        pad_token_id=tok.pad_id,
        bos_token_id=tok.bos_id,
        eos_token_id=[tok.end_id],
        disable_compile=True,
    )
    torch.manual_seed(0)
    outs = engine.generate(flat, params)
    with torch.no_grad():
        comp = hf.generate(ids, attention_mask=attn, generation_config=gen_cfg)[:, P:]
    steps = comp.shape[1]
    is_end = comp == tok.end_id
    hf_tokens = int(torch.where(is_end.any(1), is_end.int().argmax(1) + 1, steps).sum())
    ns_tokens = sum(len(o.token_ids) for o in outs)

    # the update's batch: nanoseek's rollouts, right-padded
    seqs = [p + o.token_ids for p, o in zip(flat, outs, strict=True)]
    T = max(len(s) for s in seqs)
    batch = torch.full((B, T), tok.pad_id)
    bmask = torch.zeros(B, T, dtype=torch.long)
    for b, s in enumerate(seqs):
        batch[b, : len(s)], bmask[b, : len(s)] = torch.tensor(s), 1
    rewards = torch.tensor(
        [task.reward(problems[i // GROUP_SIZE], o.text).total for i, o in enumerate(outs)]
    )
    some = (group_advantages(rewards, GROUP_SIZE, scale_std=False) != 0).nonzero()[:, 0]

    def fwd_bwd(model, rows, hf_side):
        model.train()
        x = batch[rows]
        if hf_side:
            logits = model(input_ids=x, attention_mask=bmask[rows]).logits
        else:
            logits = model(x).logits
        logp = logits[:, :-1].float().log_softmax(-1).gather(-1, x[:, 1:, None])
        (logp * bmask[rows, 1:, None]).sum().backward()
        model.zero_grad(set_to_none=True)
        model.eval()

    def hf_generate():
        with torch.no_grad():
            hf.generate(ids, attention_mask=attn, generation_config=gen_cfg)

    work = {
        "nanoseek Engine": lambda: engine.generate(flat, params),
        "transformers generate": hf_generate,
        "transformers, all rows": lambda: fwd_bwd(hf, torch.arange(B), True),
        "nanoseek, all rows": lambda: fwd_bwd(ns, torch.arange(B), False),
        "nanoseek, useful rows": lambda: fwd_bwd(ns, some, False),
        "refresh": engine.refresh_weights,
    }
    times: dict[str, list[float]] = {k: [] for k in work}
    for r in range(repeats + 1):
        for k, fn in work.items():
            t = time.perf_counter()
            fn()
            if r:  # round 0 warms up (the engine's first calls are ~2x slower)
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: f"{min(v):.2f}-{max(v):.2f}" for k, v in times.items()}
    print(
        format_table(
            [
                (
                    "nanoseek Engine",
                    f"{med['nanoseek Engine']:.2f}",
                    spread["nanoseek Engine"],
                    "-",
                    ns_tokens,
                    f"{1e3 * med['nanoseek Engine'] / ns_tokens:.2f}",
                    "0%",
                ),
                (
                    "transformers generate",
                    f"{med['transformers generate']:.2f}",
                    spread["transformers generate"],
                    steps,
                    hf_tokens,
                    f"{1e3 * med['transformers generate'] / hf_tokens:.2f}",
                    f"{1 - hf_tokens / (B * steps):.0%}",
                ),
            ],
            f"\nrollouts of one step ({B} completions, at most {MAX_TOKENS} tokens, temperature "
            f"1), median of {repeats}; idle: row-steps spent on finished sequences",
            ("", "seconds", "range", "decode steps", "tokens", "ms/token", "idle"),
        )
    )
    print(
        format_table(
            [
                (
                    f"transformers, all {B} rows",
                    f"{med['transformers, all rows']:.2f}",
                    spread["transformers, all rows"],
                ),
                (
                    f"nanoseek, all {B} rows",
                    f"{med['nanoseek, all rows']:.2f}",
                    spread["nanoseek, all rows"],
                ),
                (
                    f"nanoseek, the {len(some)} rows with a non-zero advantage",
                    f"{med['nanoseek, useful rows']:.2f}",
                    spread["nanoseek, useful rows"],
                ),
                ("nanoseek engine.refresh_weights()", f"{med['refresh']:.3f}", spread["refresh"]),
            ],
            f"\nupdate: forward + backward of the [{B}, {T}] rollout ids, seconds",
            ("", "seconds", "range"),
        )
    )


# --- reading both sides ---------------------------------------------------------------------
def curve(run: Path, trl_side: bool) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(held-out evals as [training seconds, accuracy, step], rollout rewards as [seconds,
    reward], the step rows). nanoseek's `elapsed` includes its evaluations; its training seconds are
    its steps' clock `train_s` (older runs: the running sum of rollout + update seconds)."""
    recs = read_metrics(run / "metrics.jsonl")
    ev, rw, rows, t = [], [], [], 0.0
    for r in recs:
        if trl_side:
            t = r["elapsed"]
        elif r.get("train_s") is not None:  # the run's own clock of its steps
            t = r["train_s"]
        elif r.get("rollout_s") is not None:  # runs from before train_s was logged
            t += r["rollout_s"] + r["update_s"]
        if r.get("rollout_s") is not None:
            rows.append({**r, "train_s": t})
            if r.get("reward") is not None:
                rw.append((t, r["reward"]))
        if r.get("val_accuracy") is not None:
            ev.append((t, r["val_accuracy"], r["step"]))
    return np.array(ev).reshape(-1, 3), np.array(rw).reshape(-1, 2), rows


def side_row(
    name: str, ev: np.ndarray, rows: list[dict], upto: float, settings: str
) -> tuple[Any, ...]:
    """The table row of one side, from its evaluations at training seconds <= upto."""
    ev = ev[ev[:, 0] <= upto + 1e-6]
    rows = [r for r in rows if r["train_s"] <= (ev[-1, 0] + 1e-6)]
    secs = ev[-1, 0]
    before, after = ev[0, 1], ev[-1, 1]
    gain = 100 * (after - before)
    n = max(len(rows), 1)
    roll = sum(r["rollout_s"] for r in rows) / n
    upd = sum(r["update_s"] for r in rows) / n
    gen = (
        f"{sum(r['generate_s'] for r in rows) / n:.2f}" if rows and "generate_s" in rows[0] else "-"
    )
    slope = np.polyfit(ev[:, 0] / 60, 100 * ev[:, 1], 1)[0] if len(ev) > 1 else float("nan")
    return (
        name,
        settings,
        len(rows),
        f"{secs / 60:.1f}",
        f"{before:.1%}",
        f"{after:.1%}",
        f"{max(ev[:, 1]):.1%}",
        f"{gain:+.1f}",
        f"{gain / max(secs / 60, 1e-9):+.2f}",
        f"{slope:+.2f}",
        f"{secs / n:.2f}",  # the clock's: async rollouts overlap the updates
        gen,
        f"{roll:.2f}",
        f"{upd:.2f}",
    )


def time_to_reach(trl_ev: np.ndarray, our_ev: np.ndarray, window: int = 3) -> str:
    """Gain per CPU-minute on a curve that saturates: the training minutes nanoseek took to
    reach TRL's final held-out accuracy, read where the mean of `window` consecutive
    evaluations first reaches it (one evaluation alone is +-3.5 points at n = 200)."""
    target, trl_min = trl_ev[-1, 1], trl_ev[-1, 0] / 60
    acc = our_ev[:, 1]
    for i in range(len(acc) - window + 1):
        if acc[i : i + window].mean() >= target - 1e-9:
            mins = our_ev[i + window - 1, 0] / 60  # once the window's last one is in
            return (
                f"TRL's final accuracy ({target:.1%}, after {trl_min:.1f} training minutes) "
                f"reached by nanoseek after {mins:.1f} (the mean of {window} evaluations "
                f"in a row, steps {int(our_ev[i, 2])}-{int(our_ev[i + window - 1, 2])}): "
                f"{trl_min / max(mins, 1e-9):.2f}x TRL's gain per CPU-minute"
            )
    return f"nanoseek never held TRL's final accuracy ({target:.1%}) over {window} evaluations"


def plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], png: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, step_ax, rew_ax) = plt.subplots(1, 3, figsize=(15, 4))
    w = 20  # steps per point of the reward curves
    for i, (name, (ev, rw)) in enumerate(curves.items()):
        acc_ax.plot(ev[:, 0] / 60, ev[:, 1], "o-", color=f"C{i}", label=name)
        step_ax.plot(ev[:, 2], ev[:, 1], "o-", color=f"C{i}", label=name)
        if len(rw) >= w:
            smooth = np.convolve(rw[:, 1], np.ones(w) / w, mode="valid")
            rew_ax.plot(rw[w - 1 :, 0] / 60, smooth, color=f"C{i}", label=f"{name} (mean of {w})")
    acc_ax.set_ylabel("held-out accuracy (greedy, n=200)")
    rew_ax.set_ylabel("mean reward of the rollouts")
    step_ax.set_xlabel("GRPO step (the same 16 problems at each step on both sides)")
    for ax in (acc_ax, rew_ax):
        ax.set_xlabel("training minutes (evaluation excluded)")
    for ax in (acc_ax, step_ax, rew_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--init", default="runs/r1/sft", help="the SFT'd starting checkpoint")
    ap.add_argument("--minutes", type=float, default=15.0, help="training minutes per side")
    ap.add_argument("--out", default="runs/bench_grpo_trl")
    ap.add_argument(
        "--ours",
        default=None,
        help="an existing nanoseek rl run to compare with (default: run r1.rl_stage into OUT/nanoseek)",
    )
    ap.add_argument(
        "--trl-run",
        default=None,
        help="an existing TRL run directory of this script (OUT/trl_run): only rebuild the table",
    )
    ap.add_argument("--eval-seconds", type=float, default=180.0, help="TRL: evaluate every N s")
    ap.add_argument("--eval-n", type=int, default=200, help="held-out problems per evaluation")
    ap.add_argument("--max-steps", type=int, default=2000, help="TRL: steps at most (dataset)")
    ap.add_argument("--check-steps", type=int, default=200, help="steps whose prompts are checked")
    ap.add_argument("--png", default="docs/grpo_trl.png")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (cores) per side")
    ap.add_argument(
        "--async-rollouts",
        action="store_true",
        help="nanoseek: rollouts in their own process on one of the --threads cores (>= 2)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="only time one step's rollouts and update both ways (no training)",
    )
    args = ap.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from nanoseek.posttrain.evaluate import checkpoint_dir

    init, out = checkpoint_dir(args.init), Path(args.out)
    if args.profile:
        profile(init)
        return
    out.mkdir(parents=True, exist_ok=True)

    if args.trl_run:
        trl_dir = Path(args.trl_run)
    else:
        trl_dir = out / "trl_run"
        trl_dir.mkdir(parents=True, exist_ok=True)
        print(f"\n== TRL GRPOTrainer, {args.minutes:g} minutes from {init}", flush=True)
        trl_run(args, init, trl_dir)
    trl_summary = json.loads((trl_dir / "summary.json").read_text())

    if args.ours:
        ours = Path(args.ours)
    else:
        from nanoseek import r1

        ours = out / "nanoseek"
        print(f"\n== nanoseek rl, {args.minutes:g} minutes from {init}", flush=True)
        if args.async_rollouts and args.threads < 2:
            sys.exit("--async-rollouts needs --threads 2 or more (one core samples)")
        r1.rl_stage(
            init,
            ours,
            args.minutes,
            args.threads,
            args.async_rollouts,
            dtype="fp32",  # as TRL's side (nanoseek's auto picks bf16 where the CPU has it)
            eval_n=args.eval_n,
            progress=False,
        )
    ours_summary = (
        json.loads((ours / "summary.json").read_text()) if (ours / "summary.json").is_file() else {}
    )

    trl_ev, trl_rw, trl_rows = curve(trl_dir, trl_side=True)
    our_ev, our_rw, our_rows = curve(ours, trl_side=False)
    budget = trl_ev[-1, 0]
    s = trl_summary["settings"]
    trl_settings = (
        f"{s['loss_type']}, scale_rewards {s['scale_rewards']}, beta {s['beta']:g}, "
        f"lr {s['learning_rate']:g}"
    )
    our_settings = (
        f"{ours_summary.get('variant', 'dr_grpo')}, no std, beta {ours_summary.get('beta', 0):g}, "
        f"lr {LR:g}"
    )
    rows = [
        side_row("TRL", trl_ev, trl_rows, math.inf, trl_settings),
        side_row("nanoseek (same time)", our_ev, our_rows, budget, our_settings),
    ]
    if our_ev[-1, 0] > budget + 1:
        rows.append(side_row("nanoseek (whole run)", our_ev, our_rows, math.inf, our_settings))
    header = (
        "side",
        "settings",
        "steps",
        "train min",
        "before",
        "after",
        "best",
        "gain (pts)",
        "pts/CPU-min",
        "fit pts/min",
        "s/step",
        "generate s",
        "rollout s",
        "update s",
    )
    print(
        format_table(
            rows,
            f"\nheld-out accuracy (n={trl_summary['held_out_n']}, greedy, nanoseek's evaluate_task), "
            f"{args.threads} thread(s) a side; minutes of training, evaluation excluded; fit: least-squares slope of "
            "every evaluation against minutes; s/step: training minutes / steps; per-step "
            "seconds: rollout = generate + rewards + advantages (async: in the sampler's "
            "process, overlapping the updates), update = forward + backward + optimizer",
            header,
        )
    )
    # The same problems at each step and the same loss: the learning per step should match.
    last = int(trl_ev[-1, 2])
    by_step = {}
    for name, rs in (("nanoseek", our_rows), ("TRL", trl_rows)):
        by_step[name] = {r["step"]: r["reward"] for r in rs if r.get("reward") is not None}
    windows = []
    for a in range(1, last - 39 + 1, 40):  # whole windows of 40 steps
        b = a + 39
        means = [
            np.mean([v for s, v in by_step[n].items() if a <= s <= b] or [np.nan])
            for n in ("nanoseek", "TRL")
        ]
        windows.append((f"steps {a}-{b}", *(f"{m:.3f}" for m in means)))
    print(
        format_table(
            windows,
            "\nmean rollout reward by step (128 completions a step, the same problems on both sides)",
            ("", "nanoseek", "TRL"),
        )
    )
    print(time_to_reach(trl_ev, our_ev))
    print(
        f"TRL prompts: {trl_summary['prompt_mismatches']} of {trl_summary['prompts_checked']:,} "
        "tokenize differently from nanoseek's chat_prompt; "
        f"{trl_summary.get('steps_with_other_problems', '?')} TRL steps trained on other problems "
        "than nanoseek's rl at the same step"
    )
    title = (
        f"GRPO (dr_grpo, beta 0) on arithmetic from {args.init}: nanoseek vs TRL "
        f"{trl_summary['trl_version']} ({args.threads} CPU thread(s) a side"
        f"{', nanoseek async' if ours_summary.get('async_rollouts') else ''})"
    )
    plot({"nanoseek": (our_ev, our_rw), "TRL GRPOTrainer": (trl_ev, trl_rw)}, args.png, title)
    print(f"plot: {args.png}")
    print(
        "regenerate this table: python -m benchmarks.grpo_trl "
        f"--init {args.init} --trl-run {trl_dir} --ours {ours} --png {args.png} "
        f"--threads {args.threads}"
    )


if __name__ == "__main__":
    main()
