"""Training throughput: nanoseek's train step against a plain `transformers` training loop of
DeepseekV3ForCausalLM with the same config, batch, dtype and optimizer settings.

    python -m benchmarks.train_throughput [--preset small] [--batch-size 8] [--seq-len 256]
                                          [--dtype auto|bf16|fp32] [--steps 10] [--warmup 3]
                                          [--compile] [--twin dense-small] [--python-experts]
                                          [--bf16-states] [--mm-products]
                                          [--model KEY=VALUE ...]

Both sides: random tokens, AdamW, gradient clipping, bf16 autocast where the hardware has
native bf16 matmul (else fp32). `transformers` has no MTP, so nanoseek is timed twice: with
MTP off (the same model work) and with MTP on (what `nanoseek train` runs). MFU uses each
side's own matmul FLOPs per token over this machine's measured matmul peak for the dtype.
--compile adds nanoseek under torch.compile, MTP off and on (the warm-up steps absorb the
compilation);
--twin PRESET adds nanoseek's step for a second preset (MoE against its dense twin, in the
same run). --python-experts adds the preset's step with its experts in the Python loop
(`moe._ExpertLoop`): on CPU nanoseek runs them in C++ (`moe._FusedExpertLoop`).
--bf16-states adds each nanoseek preset's step (MTP on) with AdamW's moments in bf16
(`nanoseek train --optim-states bf16`, DeepSeek-V3's recipe). --mm-products adds each
nanoseek preset's step (MTP on) with the bf16 expert and MLP products as at::mm calls
(NANOSEEK_AMX=0) where the CPU has AMX and nanoseek would run them on its tiles.

The rows' steps run interleaved (round after round, one step of each), after --warmup
untimed steps of each, so a shared machine's drift falls on all alike.

Allocator: `nanoseek train` tells glibc to keep freed memory (`keep_freed_memory`: no fresh
pages for each step's gradients). The first row is `transformers` as a plain loop runs it
(glibc's defaults), timed alone first; then the allocator is set as nanoseek sets it, and
every later row, `transformers` again among them, runs under it: the like-for-like ratio is
against that second `transformers` row. --default-malloc leaves glibc's defaults for all
rows.

--model KEY=VALUE overrides a model config field of every row (repeatable), with
`benchmarks.moe_vs_dense`'s rule for a `dense-small` twin (its MLP as wide as the MoE's
experts a token): the pair that benchmark trains, e.g. `--model hidden_size=128`.
"""

from __future__ import annotations

import argparse
import functools
import os
from contextlib import nullcontext
from typing import Any

import torch

from benchmarks.moe_vs_dense import (
    DENSE_OWN,
    model_overrides,
    parse_override,
    refuse_unknown_fields,
)
from benchmarks.timing import interleaved_medians, median_seconds
from nanoseek.compute import flops_per_token, measure_matmul_peak
from nanoseek.config import ModelConfig, get_preset
from nanoseek.device import keep_freed_memory, resolve_dtype
from nanoseek.model import Transformer, moe
from nanoseek.train.balance import update_expert_bias
from nanoseek.train.run import build_optimizer
from nanoseek.train.runtime import Runtime
from nanoseek.utils import format_table


def time_steps(step, warmup: int, steps: int) -> float:
    return median_seconds(step, steps, warmups=warmup)


def nanoseek_step(
    cfg,
    x,
    y,
    autocast,
    mtp_weight: float,
    compile: bool = False,
    expert_kernel: bool = True,
    states: str = "fp32",
    amx: bool = True,
):
    """expert_kernel=False: the Python expert loop where fp32 would run the C++ one; states:
    AdamW's moments' dtype; amx=False: the C++ loop's bf16 products as at::mm calls."""
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    opt = build_optimizer(model, lr=3e-3, weight_decay=0.1, states=states)
    layers = model.moe_layers()
    forward = torch.compile(model) if compile else model

    rt = Runtime(rank=0, world=1, local_rank=0, device=x.device, dtype=torch.float32)

    def step():
        moe.EXPERT_KERNEL = expert_kernel  # the rows' steps interleave: set it every step
        os.environ["NANOSEEK_AMX"] = "1" if amx else "0"  # read by experts.cpp at each call
        with autocast():
            out = forward(x, targets=y, mtp_weight=mtp_weight)
        out.loss.backward()
        rt.clip_grads(model, 1.0, opt)  # as `nanoseek train` clips: in the fused AdamW step
        opt.step()
        opt.zero_grad(set_to_none=True)
        if layers:
            update_expert_bias(layers, out.expert_counts, 0.001)

    return step


def transformers_step(cfg, x, autocast):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**cfg.to_hf_dict())).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    labels = x  # HF shifts the labels itself, so it predicts the same next tokens

    def step():
        with autocast():
            loss = model(input_ids=x, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def preset_configs(presets: list[str], shape: dict[str, Any]) -> dict[str, ModelConfig]:
    """Each preset's model config with --model's overrides; a `dense-small` twin gets its MLP
    width from the overridden MoE, as in `benchmarks.moe_vs_dense`."""
    refuse_unknown_fields(shape)
    if "dense-small" not in presets or not shape:
        return {p: get_preset(p).replace(**shape) for p in presets}
    if DENSE_OWN & shape.keys():
        raise SystemExit(
            f"--model cannot set {', '.join(sorted(DENSE_OWN & shape.keys()))} with a "
            "dense-small twin, which derives them; time that MoE layout without --twin"
        )
    per_preset = model_overrides(shape, {})
    return {p: get_preset(p).replace(**per_preset.get(p, shape)) for p in presets}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="add nanoseek under torch.compile")
    ap.add_argument("--twin", help="add nanoseek's step for this preset too (e.g. dense-small)")
    ap.add_argument(
        "--python-experts",
        action="store_true",
        help="add the preset's step with the Python expert loop (CPU runs the C++ one)",
    )
    ap.add_argument(
        "--bf16-states",
        action="store_true",
        help="add each nanoseek preset's step with AdamW's moments in bf16",
    )
    ap.add_argument(
        "--mm-products",
        action="store_true",
        help="add each nanoseek preset's step with the bf16 products as at::mm (no AMX tiles)",
    )
    ap.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's allocator defaults for every row (no keep_freed_memory)",
    )
    ap.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model config field of every row (the twin's MLP follows the MoE)",
    )
    args = ap.parse_args(argv)

    shape = dict(parse_override(item) for item in args.model)
    configs = preset_configs([args.preset] + ([args.twin] if args.twin else []), shape)
    cfg = configs[args.preset]
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    autocast = (
        (lambda: torch.autocast("cpu", dtype=dtype)) if dtype != torch.float32 else nullcontext
    )
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=g)
    x, y = data[:, :-1], data[:, 1:]
    tokens = args.batch_size * args.seq_len
    peak = measure_matmul_peak(dtype, "cpu")
    fpt = flops_per_token(cfg.replace(num_nextn_predict_layers=0), args.seq_len)

    hf = functools.partial(transformers_step, cfg, x, autocast)
    specs = [("transformers DeepseekV3ForCausalLM", hf, fpt)]
    tuned = not args.default_malloc
    if tuned:  # the rows after the first run with the allocator as `nanoseek train` sets it
        specs.append(("transformers, the same allocator", hf, fpt))
    specs.append(
        ("nanoseek (MTP off: same work)", lambda: nanoseek_step(cfg, x, y, autocast, 0.0), fpt)
    )
    if args.compile:
        specs.append(
            (
                "nanoseek (MTP off, compiled)",
                lambda: nanoseek_step(cfg, x, y, autocast, 0.0, compile=True),
                fpt,
            )
        )
    for preset, c in configs.items():
        for compiled in [False] + ([True] if args.compile else []):
            label = f"nanoseek {preset} (MTP on{', compiled' if compiled else ''})"
            make = functools.partial(nanoseek_step, c, x, y, autocast, 0.3, compiled)
            specs.append((label, make, flops_per_token(c, args.seq_len)))
        if args.bf16_states:
            label = f"nanoseek {preset} (MTP on, bf16 optimizer states)"
            make = functools.partial(nanoseek_step, c, x, y, autocast, 0.3, states="bf16")
            specs.append((label, make, flops_per_token(c, args.seq_len)))
        if args.mm_products:
            label = f"nanoseek {preset} (MTP on, at::mm products)"
            make = functools.partial(nanoseek_step, c, x, y, autocast, 0.3, amx=False)
            specs.append((label, make, flops_per_token(c, args.seq_len)))
        if preset == args.preset and args.python_experts:
            label = f"nanoseek {preset} (MTP on, Python expert loop)"
            make = functools.partial(nanoseek_step, c, x, y, autocast, 0.3, expert_kernel=False)
            specs.append((label, make, flops_per_token(c, args.seq_len)))
    if args.compile:
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = 64  # several models compiled in one process
    seconds = []
    if tuned:  # glibc's defaults first, alone (the setting cannot be undone)
        seconds.append(time_steps(hf(), args.warmup, args.steps))
        print(f"  measured {specs[0][0]}: {seconds[0] * 1e3:.0f} ms/step", flush=True)
        if not keep_freed_memory():
            print("  (keep_freed_memory does not apply here: not Linux glibc)")
    steps = [make() for _, make, _ in specs[len(seconds) :]]
    seconds += interleaved_medians(steps, args.steps, args.warmup)
    rows = []
    for (name, _, f), sec in zip(specs, seconds, strict=True):
        rows.append((name, sec, tokens / sec, f * tokens / sec / peak))

    base = rows[1 if tuned else 0][2]  # like for like: the same allocator setting
    print(
        f"\ntraining throughput: preset {args.preset}, batch {args.batch_size} x {args.seq_len}, "
        f"{str(dtype)[6:]}, {torch.get_num_threads()} threads, AdamW + clip; median of "
        f"{args.steps} steps, the rows' steps interleaved"
    )
    print(f"matmul peak ({str(dtype)[6:]}, measured): {peak / 1e12:.2f} TFLOP/s")
    if shape:
        print(f"model overrides: {shape}")
    table = [
        (name, f"{sec * 1e3:.0f}", f"{tps:,.0f}", f"{mfu:.1%}", f"{tps / base:.2f}x")
        for name, sec, tps, mfu in rows
    ]
    if tuned:
        print(
            "the first row runs with glibc's allocator defaults, every other row with "
            "nanoseek's (keep_freed_memory); ratios are to the second row"
        )
    print(format_table(table, header=("", "ms/step", "tokens/s", "MFU", "vs transformers")))
    if args.twin:
        tps = {r[0]: r[2] for r in rows}

        def ratio(variant: str) -> float:  # the preset's tokens/s over its twin's, one variant
            return (
                tps[f"nanoseek {args.preset} ({variant})"]
                / tps[f"nanoseek {args.twin} ({variant})"]
            )

        pair = f"{args.preset} / {args.twin} tokens/s"
        print(f"{pair} (MTP on, eager): {ratio('MTP on'):.2f}x")
        if args.bf16_states:
            both = ratio("MTP on, bf16 optimizer states")
            print(f"{pair}, both with bf16 optimizer states: {both:.2f}x")
        if args.mm_products:
            print(f"{pair}, both on at::mm: {ratio('MTP on, at::mm products'):.2f}x")
    if tuned:
        print(
            f"nanoseek (MTP off) against transformers with glibc's defaults, as a plain loop "
            f"runs it: {rows[2][2] / rows[0][2]:.2f}x"
        )


if __name__ == "__main__":
    main()
