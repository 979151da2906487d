"""`make r1`: from nothing to a model that answers held-out arithmetic with reasoning, the
DeepSeek-R1 recipe at toy scale, in about 28 minutes on 2 CPU cores.

1. data: 30,000 training problems of the `arithmetic` task (2-3 digit + and -, none from
   the held-out set), each with a worked solution in its <think> block (column arithmetic
   from the ones digit up, the answer so far after each column) as SFT chats; a byte-level
   BPE tokenizer that keeps digits apart;
2. a fresh model: the `tiny` preset widened to 128 with 4 layers (936K parameters, MLA +
   DeepSeekMoE, no MTP module): the base;
3. SFT, 600 steps: the format, and 40-55% of the held-out problems (pass@8 65-75%), which
   leaves GRPO room (longer SFT leaves it less; shorter, too little to reinforce: from
   480 steps, 14% with pass@8 25%, 15 minutes of GRPO gained 3.5 points: docs/posttrain.md);
4. GRPO (dr_grpo, beta 0) on the task's verifier, from the SFT checkpoint, 25 minutes on
   both cores: async rollouts, the sampler on one core one step ahead of the trainer on
   the other (held-out accuracy still rises, slowly, at the end);
5. the report card (base, SFT, RL: accuracy, format, mean length, pass@8 on 200 held-out
   problems) in runs/r1/report.md + .json, and a few held-out answers with their reasoning.

The same with the CLI (after step 1-2's data and base model):
    nanoseek sft runs/r1/base --data runs/r1/data/chats.jsonl --out runs/r1/sft --steps 600 \\
        --batch-size 32 --lr 3e-3 --mtp-weight 0 --threads 1
    nanoseek rl runs/r1/sft --task arithmetic --out runs/r1/rl --minutes 25 \\
        --max-completion-tokens 64 --eval-n 200 --async-rollouts --threads 1
    nanoseek eval runs/r1/base runs/r1/sft runs/r1/rl --task arithmetic --n 200 --k 8 \\
        --max-tokens 64 --out runs/r1/report.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from nanoseek.data.tokenizer import SPECIAL_TOKENS, Tokenizer
from nanoseek.posttrain.tasks import Problem, get_task
from nanoseek.utils import atomic_write_text

TASK = "arithmetic"  # its defaults: 2-3 digit addition and subtraction
# Measured on 2 cores (1 thread): at width 128 x 4 layers, 600 SFT steps of 32 chats reach
# 42% held-out accuracy in fp32 on an AVX2 EPYC (3.6 minutes; 900 steps ~74%) and 54% in
# bf16 on an EPYC with native bf16 (2 minutes); 300 steps 1%, 480 steps 14%.
MODEL = dict(
    hidden_size=128,
    num_hidden_layers=4,
    intermediate_size=256,
    moe_intermediate_size=64,
    num_nextn_predict_layers=0,  # MTP would cost a fifth of the SFT time; RL never uses it
    max_position_embeddings=256,
)
MAX_TOKENS = 64  # the longest worked solution is ~50 tokens


def worked_solution(problem: Problem) -> str:
    """Column arithmetic from the ones digit up, the answer so far after each column:
    `876 + 141` -> `6+1+0=7>7, 7+4+0=11>17, 8+1+1=10>017, 1>1017`;
    `862 - 145` -> `2-5-0=7 b>7, 6-4-1=1>17, 8-1-0=7>717` (b: borrow from the next column).
    Each step reads two digits and the carry, and copies the answer so far with one digit in
    front, so the final answer is a copy, never a reversal."""
    a, b, op = problem.meta["a"], problem.meta["b"], problem.meta["op"]
    if op not in "+-":
        raise ValueError(f"no worked solution for {op!r}")
    da, db = str(a)[::-1], str(b)[::-1]
    steps, so_far, carry = [], "", 0  # carry: the carry (+) or borrow (-) into this column
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        if op == "+":
            s = x + y + carry
            so_far = str(s % 10) + so_far
            steps.append(f"{x}+{y}+{carry}={s}>{so_far}")
            carry = s // 10
        else:
            d = x - y - carry
            so_far = str(d % 10) + so_far
            steps.append(f"{x}-{y}-{carry}={d % 10}{' b' if d < 0 else ''}>{so_far}")
            carry = int(d < 0)
    if carry:  # only addition ends with one (a >= b, so subtraction never does)
        so_far = "1" + so_far
        steps.append(f"1>{so_far}")
    return ", ".join(steps)


def chat(problem: Problem) -> dict[str, Any]:
    reply = {
        "role": "assistant",
        "content": problem.answer,
        "reasoning_content": worked_solution(problem),
    }
    return {"messages": [{"role": "user", "content": problem.prompt}, reply]}


def digit_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE whose digits are always single tokens (as LLaMA's): a merged "17"
    would hide which column each digit belongs to."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return Tokenizer(tok)


# --- the stages -----------------------------------------------------------------------------
def make_data(out: Path, n: int, seed: int = 1) -> tuple[Path, Tokenizer]:
    """out/chats.jsonl (n training chats) and a tokenizer trained on a tenth of them."""
    problems = get_task(TASK).generate(seed, n)
    chats = out / "chats.jsonl"
    atomic_write_text(chats, "".join(json.dumps(chat(p)) + "\n" for p in problems))
    texts = [f"{p.prompt}<think>{worked_solution(p)}</think>{p.answer}" for p in problems[::10]]
    return chats, digit_tokenizer(texts, vocab_size=320)


def make_base(out: Path, tokenizer: Tokenizer, seed: int = 0) -> Path:
    import torch

    from nanoseek import Transformer, get_preset, save_pretrained

    cfg = get_preset("tiny").replace(vocab_size=tokenizer.vocab_size, **MODEL)
    torch.manual_seed(seed)
    save_pretrained(Transformer(cfg), out)
    tokenizer.save(out)
    return out


def sft_stage(base: Path, chats: Path, out: Path, steps: int, threads: int) -> dict[str, Any]:
    from nanoseek.posttrain.sft import SFTConfig, sft

    # A model trained from scratch takes a high LR; no MTP module, so no MTP loss.
    return sft(
        SFTConfig(
            init=str(base),
            data=str(chats),
            out=str(out),
            steps=steps,
            batch_size=32,
            lr=3e-3,
            warmup_steps=20,
            mtp_weight=0.0,
            eval_every=100,
            threads=threads,
            overwrite=True,
        )
    )


def rl_stage(
    init: Path, out: Path, minutes: float, threads: int, async_rollouts: bool = False, **kw: Any
) -> dict[str, Any]:
    """GRPO from `init` on `threads` cores; with async_rollouts one of them samples the next
    step's rollouts while the others update."""
    from nanoseek.posttrain.rl import RLConfig, rl

    if async_rollouts and threads < 2:
        raise ValueError("async rollouts take a core of their own: give 2 threads or more")
    settings = dict(
        init=str(init),
        task=TASK,
        out=str(out),
        minutes=minutes,
        lr=3e-5,
        max_completion_tokens=MAX_TOKENS,
        eval_every=40,
        eval_n=200,
        threads=threads - 1 if async_rollouts else threads,
        async_rollouts=async_rollouts,
        overwrite=True,
    )
    settings.update(kw)
    return rl(RLConfig(**settings))


def report(runs: dict[str, Path], out: Path, n: int, k: int) -> tuple[str, list[dict]]:
    """The report card of the named checkpoints, written to out (.md + .json)."""
    from nanoseek.posttrain.evaluate import (
        evaluate_task,
        load_model,
        report_card,
        write_report_card,
    )

    rows = []
    for name, path in runs.items():
        model, tok = load_model(path)
        r = evaluate_task(
            model, tok, get_task(TASK), n=n, k=k, samples=k, max_tokens=MAX_TOKENS, max_batch=128
        )
        rows.append({"name": name, **r.row()})
    write_report_card(out, rows)
    return report_card(rows)[0], rows


def examples(path: Path, n: int = 5) -> list[str]:
    """Greedy answers to the first n held-out problems, reasoning included."""
    from nanoseek.infer import SamplingParams
    from nanoseek.posttrain.evaluate import chat_prompt, load_model, make_engine

    model, tok = load_model(path)
    task = get_task(TASK)
    problems = task.held_out(n)
    prompts = [chat_prompt(tok, p) for p in problems]
    engine = make_engine(model, tok, prompts, MAX_TOKENS, n)
    outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    lines = []
    for p, c in zip(problems, outs, strict=True):
        mark = "right" if task.reward(p, c.text).correct else f"wrong, {p.answer}"
        lines.append(f"{p.prompt}  <think>{c.text}  ({mark})")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default="runs/r1")
    ap.add_argument("--chats", type=int, default=30_000, help="SFT chats to make")
    ap.add_argument("--sft-steps", type=int, default=600)
    ap.add_argument("--rl-minutes", type=float, default=25.0)
    ap.add_argument("--n", type=int, default=200, help="held-out problems in the report")
    ap.add_argument("--k", type=int, default=8, help="pass@k in the report")
    ap.add_argument(
        "--threads",
        type=int,
        default=2,
        help="CPU threads (cores) of GRPO and the report (default 2: with async rollouts one "
        "samples while the other trains; use 1 with --no-async-rollouts when another job "
        "holds a core, as a second thread spin-waits against it)",
    )
    ap.add_argument(
        "--sft-threads",
        type=int,
        default=1,
        help="CPU threads of SFT (default 1: where 600 steps land on the steep part of the "
        "curve depends on the matmuls' rounding, which changes with the thread count: 54%% "
        "held-out on 1 thread, 33.5%% on 2, on the same CPU)",
    )
    ap.add_argument(
        "--async-rollouts",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="GRPO samples the next step's rollouts on one core while the others update "
        "(default; needs --threads 2 or more: 0.57 s a step against 0.78 s for two "
        "synchronous threads)",
    )
    args = ap.parse_args(argv)
    if args.async_rollouts and args.threads < 2:
        ap.error("--async-rollouts needs --threads 2 or more; or give --no-async-rollouts")
    out = Path(args.out)
    times: dict[str, float] = {}
    t0 = time.perf_counter()

    print(f"== 1/5  data: {args.chats:,} arithmetic chats with worked solutions", flush=True)
    chats, tokenizer = make_data(out / "data", args.chats)
    print("\n== 2/5  a fresh model (the base)", flush=True)
    base = make_base(out / "base", tokenizer)
    times["data + base"] = time.perf_counter() - t0
    t = time.perf_counter()
    print(f"\n== 3/5  SFT, {args.sft_steps} steps", flush=True)
    sft_stage(base, chats, out / "sft", args.sft_steps, args.sft_threads)
    times["sft"] = time.perf_counter() - t

    t = time.perf_counter()
    print(f"\n== 4/5  GRPO, {args.rl_minutes:g} minutes", flush=True)
    s = rl_stage(out / "sft", out / "rl", args.rl_minutes, args.threads, args.async_rollouts)
    times["rl"] = time.perf_counter() - t

    t = time.perf_counter()
    print(f"\n== 5/5  report card ({args.n} held-out problems)", flush=True)
    import torch

    torch.set_num_threads(args.threads)
    runs = {"base": base, "sft": out / "sft", "rl": out / "rl"}
    card, rows = report(runs, out / "report.md", args.n, args.k)
    times["report"] = time.perf_counter() - t
    print("\n" + card)
    print("held-out answers of the RL model:")
    for line in examples(out / "rl"):
        print("  " + line)
    total = time.perf_counter() - t0
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
    acc = {r["name"]: r["accuracy"] for r in rows}
    print(
        f"\nheld-out accuracy: SFT {acc['sft']:.1%} -> RL {acc['rl']:.1%} "
        f"({100 * (acc['rl'] - acc['sft']):+.1f} points in {s['steps']} GRPO steps)"
    )
    print(f"time: {stages}; {total / 60:.1f} minutes in all")
    print(f"report card: {out / 'report.md'} (+ .json); checkpoints in {out}/{{base,sft,rl}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
