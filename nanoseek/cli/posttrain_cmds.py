"""`nanoseek sft | rl | eval | distill`: supervised fine-tuning on chats, GRPO on a task's
verifiable rewards, task accuracy and a report card over checkpoints, SFT data from a
teacher by rejection sampling."""

from __future__ import annotations

import argparse
import json
import sys


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="a task name (arithmetic, countdown)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per completion")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda[:N], mps")
    p.add_argument("--dtype", default="fp32", help="auto, fp32, bf16, fp16")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1: decode matmuls are small, and 2 threads spin-wait "
        "against any other busy process)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    from nanoseek.cli.train_cmds import add_config_flags
    from nanoseek.posttrain.rl import RLConfig
    from nanoseek.posttrain.sft import SFTConfig

    p = sub.add_parser(
        "sft",
        help="supervised fine-tuning on chats (loss on the assistant's tokens only)",
        description="Fine-tune a checkpoint (or run directory) on JSONL chats, with the loss "
        "on the assistant's replies only. Budget with --steps, --tokens or --minutes. Writes "
        "OUT/ckpt (weights + tokenizer), metrics.jsonl, loss.png and summary.json; --resume "
        "continues exactly. Example: nanoseek sft runs/base --data chats.jsonl --out runs/sft "
        "--steps 300",
    )
    p.add_argument("--config", default=None, help="TOML or YAML file with the settings below")
    add_config_flags(p, SFTConfig, positional="init")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser(
        "rl",
        help="GRPO on a task's verifiable rewards (the DeepSeek-R1 recipe)",
        description="Reinforcement learning from a (SFT'd) checkpoint: per step, G "
        "completions per problem sampled by nanoseek's engine, rewards from the task's "
        "verifier, group-normalised advantages, the clipped objective (variants grpo, dr_grpo, "
        "dapo). Defaults: dr_grpo with beta 0 (no reference model: Dr. GRPO and DAPO found the "
        "KL unneeded with verifiable rewards, and it saves a forward), lr 3e-5, G 8, 16 "
        "problems per step, temperature 1. Writes OUT/ckpt, metrics.jsonl, rl.png and "
        "summary.json; --resume continues exactly. Example: nanoseek rl runs/sft --task "
        "arithmetic --out runs/rl --steps 200",
    )
    p.add_argument("--config", default=None, help="TOML or YAML file with the settings below")
    add_config_flags(p, RLConfig, skip=("task_options",), positional="init")
    p.set_defaults(func=cmd_rl)

    p = sub.add_parser(
        "eval",
        help="task accuracy (and bits/byte) of checkpoints: a report card",
        description="Evaluate checkpoints (or run directories) on a task's held-out set: "
        "greedy accuracy, format rate, mean length, pass@k with sampling, and bits/byte on "
        "token shards with --data. One row per checkpoint, e.g. base, SFT, RL. Example: "
        "nanoseek eval runs/base runs/sft --task arithmetic --k 4 --out report.md",
    )
    p.add_argument("ckpt", nargs="+", help="checkpoint or run directories, one row each")
    _common(p)
    p.add_argument("--n", type=int, default=100, help="held-out problems")
    p.add_argument("--k", type=int, default=0, help="pass@k with sampling (0 = off)")
    p.add_argument("--samples", type=int, default=None, help="samples per problem (>= k)")
    p.add_argument("--temperature", type=float, default=1.0, help="for the pass@k samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="token shard directory: adds bits/byte")
    p.add_argument("--seq-len", type=int, default=256, help="bits/byte window length")
    p.add_argument("--val-batches", type=int, default=8, help="bits/byte batches (of 8)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--out", default=None, help="write the report card here (.md, + .json)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "distill",
        help="SFT data from a teacher: sample, keep what the verifier accepts",
        description="Rejection sampling: sample --samples-per-prompt reasoning completions "
        "for each of --n training problems, keep the ones the task's verifier accepts, and "
        "write them as SFT chats (JSONL). Example: nanoseek distill runs/rl --task "
        "arithmetic --n 500 --out data/distill.jsonl",
    )
    p.add_argument("teacher", help="the teacher's checkpoint or run directory")
    _common(p)
    p.add_argument("--n", type=int, required=True, help="training problems (prompts)")
    p.add_argument("--out", required=True, help="output .jsonl")
    p.add_argument("--samples-per-prompt", type=int, default=4)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=1, help="training problems' seed (>= 1)")
    p.set_defaults(func=cmd_distill)


def _setup(args):
    import torch

    from nanoseek.device import resolve_device, resolve_dtype
    from nanoseek.posttrain.tasks import get_task

    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.max_tokens < 1 or args.max_batch < 1:
        raise ValueError("--max-tokens and --max-batch must be >= 1")
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    return get_task(args.task), device, resolve_dtype(args.dtype, device)


def cmd_eval(args) -> int:
    from nanoseek.posttrain.evaluate import (
        bits_per_byte,
        evaluate_task,
        load_model,
        report_card,
        write_report_card,
    )

    task, device, dtype = _setup(args)
    rows = []
    for ckpt in args.ckpt:
        model, tokenizer = load_model(ckpt, device, dtype)
        result = evaluate_task(
            model,
            tokenizer,
            task,
            n=args.n,
            k=args.k,
            samples=args.samples,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            max_batch=args.max_batch,
            seed=args.seed,
        )
        row = {"name": ckpt, **result.row()}
        if args.data:
            row["bits_per_byte"] = bits_per_byte(
                model,
                args.data,
                seq_len=args.seq_len,
                n_batches=args.val_batches,
                tokenizer=tokenizer,
            )
        rows.append(row)
        print(f"[{ckpt}: accuracy {result.accuracy:.1%}]", file=sys.stderr)
    markdown, data = report_card(rows)
    print(json.dumps(data, indent=2) if args.json else markdown, end="\n" if args.json else "")
    if args.out:
        md, js = write_report_card(args.out, rows)
        print(f"wrote {md} and {js}", file=sys.stderr)
    return 0


def cmd_distill(args) -> int:
    from nanoseek.posttrain.distill import distill

    task, device, dtype = _setup(args)
    stats = distill(
        args.teacher,
        task,
        args.n,
        args.out,
        samples_per_prompt=args.samples_per_prompt,
        temperature=args.temperature,
        seed=args.seed,
        max_tokens=args.max_tokens,
        max_batch=args.max_batch,
        device=device,
        dtype=dtype,
    )
    print(f"{stats.summary()} -> {args.out}")
    return 0


def _config(args, cls):
    from nanoseek.train.config import make_config

    # every flag defaults to None, so what is left is what was given (--resume needs to know)
    given = {k: v for k, v in vars(args).items() if k not in ("command", "func", "config")}
    return make_config(args.config, cls, **given)


def cmd_sft(args) -> int:
    from nanoseek.posttrain.sft import SFTConfig, sft

    sft(_config(args, SFTConfig))
    return 0


def cmd_rl(args) -> int:
    from nanoseek.posttrain.rl import RLConfig, rl

    rl(_config(args, RLConfig))
    return 0
