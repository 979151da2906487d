"""`nanoseek compute <train|check|fleet|memory|run|flops|context|gpus|plot>`: FLOPs, GPU-hours,
cost, memory per GPU, decode cost against context length."""

from __future__ import annotations

import argparse
import json
import textwrap
from typing import Any

from nanoseek.utils import format_table

DEFAULT_SEQ_LEN = 4096  # DeepSeek-V3's pretraining sequence length


def _quantity(text: str) -> float:
    from nanoseek.compute import ComputeError, parse_quantity

    try:
        return parse_quantity(text)
    except ComputeError as e:  # argparse shows ArgumentTypeError's text as is
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from e


def _model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--preset", help="a nanoseek preset, e.g. deepseek-v3, small")
    g.add_argument("--config", help="a Hugging Face DeepSeek config.json (or its directory)")
    p.add_argument(
        "--seq-len",
        type=int,
        default=DEFAULT_SEQ_LEN,
        help=f"training sequence length for the attention term (default {DEFAULT_SEQ_LEN})",
    )


def _gpu_args(p: argparse.ArgumentParser, gpu_required: bool = True) -> None:
    p.add_argument(
        "--gpu", required=gpu_required, help="catalog GPU (see `nanoseek compute gpus`) or 'this'"
    )
    p.add_argument(
        "--precision",
        choices=("bf16", "fp8"),
        default="bf16",
        help="which dense peak MFU is measured against (default bf16)",
    )
    p.add_argument("--price", type=_quantity, help="USD per GPU-hour (default: the catalog's)")
    _common(p)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gpu-file",
        help="TOML whose [GPU] tables add to or override the catalog (or $NANOSEEK_GPUS)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def register(sub: argparse._SubParsersAction) -> None:
    top = sub.add_parser("compute", help="FLOPs, GPU-hours and cost of training; check a claim")
    cmds = top.add_subparsers(dest="compute_command", metavar="<what>", required=True)

    p = cmds.add_parser("train", help="what training a model on N tokens takes on a GPU fleet")
    _model_args(p)
    p.add_argument("--tokens", type=_quantity, required=True, help="training tokens, e.g. 14.8T")
    p.add_argument("--gpus", type=_quantity, required=True, help="number of GPUs, e.g. 2048")
    p.add_argument(
        "--mfu", type=float, default=0.4, help="model FLOPs utilisation, a fraction (default 0.4)"
    )
    _gpu_args(p)
    p.set_defaults(func=cmd_train)

    p = cmds.add_parser(
        "check", help="the MFU a claimed GPU-hour budget implies, and whether it is plausible"
    )
    _model_args(p)
    p.add_argument("--tokens", type=_quantity, required=True, help="training tokens, e.g. 14.8T")
    p.add_argument(
        "--gpu-hours", type=_quantity, required=True, help="claimed GPU-hours, e.g. 2.788M"
    )
    _gpu_args(p)
    p.set_defaults(func=cmd_check)

    p = cmds.add_parser("fleet", help="what a fleet of GPUs can train in a given time")
    _model_args(p, required=False)
    p.add_argument("--gpus", type=_quantity, required=True, help="number of GPUs, e.g. 50000")
    p.add_argument("--days", type=_quantity, required=True, help="wall-clock days")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation (default 0.4)")
    p.add_argument(
        "--tokens-per-param",
        type=float,
        default=20.0,
        help="compute-optimal tokens per parameter (Chinchilla: 20)",
    )
    _gpu_args(p)
    p.set_defaults(func=cmd_fleet)

    p = cmds.add_parser(
        "run", help="FLOPs and MFU of a finished nanoseek run, and its cost on each GPU"
    )
    p.add_argument("run_dir", help="runs/NAME (holds summary.json and config.json)")
    p.add_argument(
        "--mfu", type=float, default=0.4, help="MFU assumed on catalog GPUs (default 0.4)"
    )
    p.add_argument("--precision", choices=("bf16", "fp8"), default="bf16")
    _common(p)
    p.set_defaults(func=cmd_run)

    p = cmds.add_parser("flops", help="FLOPs per token by component, against 6 N")
    _model_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=cmd_flops)

    p = cmds.add_parser(
        "context",
        help="FLOPs of one new token and KV cache against context length (V3, V3.2, V4)",
    )
    p.add_argument(
        "--preset",
        action="append",
        help="repeat; any preset incl. deepseek-v4-flash / -pro (default: the V3-V4 family)",
    )
    p.add_argument(
        "--config", action="append", help="a Hugging Face config.json (V3, V3.2 or V4); repeat"
    )
    p.add_argument(
        "--context",
        type=_quantity,
        action="append",
        help="context length in tokens, e.g. 128K or 1M; repeat (default 4K, 128K, 1M)",
    )
    p.add_argument(
        "--kv-format",
        choices=("bf16", "release"),
        default="bf16",
        help="KV cache bytes: every value BF16, or as the releases store it (FP8, FP4 keys)",
    )
    p.add_argument(
        "--vs",
        default="deepseek-v32",
        help="reference preset for the ratios (default deepseek-v32; 'none' for no ratios)",
    )
    p.add_argument("--plot", help="also write the log-log plot of both against context here")
    p.add_argument("--json", action="store_true", help="print JSON (a list of flat objects)")
    p.set_defaults(func=cmd_context)

    p = cmds.add_parser(
        "memory", help="memory per GPU to train a model with FSDP2 x expert parallelism"
    )
    _model_args(p)
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs, e.g. 2048")
    p.add_argument("--ep", type=int, default=1, help="GPUs the routed experts are split over")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per pass")
    p.add_argument("--parallel", choices=("fsdp", "ddp"), default="fsdp")
    p.add_argument("--gpu", help="a catalog GPU, to compare against its memory")
    p.add_argument(
        "--optim-states",
        choices=("fp32", "bf16"),
        default="fp32",
        help="AdamW's moments: fp32, or bf16 (DeepSeek-V3's recipe; nanoseek train --optim-states)",
    )
    _common(p)
    p.set_defaults(func=cmd_memory)

    p = cmds.add_parser("gpus", help="the GPU catalog (peaks, memory, price, sources)")
    p.add_argument("--measure", action="store_true", help="also measure this machine's matmul peak")
    p.add_argument("--sources", action="store_true", help="print where each number comes from")
    _common(p)
    p.set_defaults(func=cmd_gpus)

    p = cmds.add_parser("plot", help="plot GPU-days and cost against model size for two GPUs")
    p.add_argument("--out", default="docs/compute_cost.png")
    p.add_argument("--gpu", action="append", help="GPU to plot (repeat; default H100 and A100)")
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--tokens-per-param", type=float, default=20.0)
    p.add_argument("--precision", choices=("bf16", "fp8"), default="bf16")
    p.add_argument("--gpu-file", help="TOML overriding the catalog")
    p.set_defaults(func=cmd_plot)


# --- commands ------------------------------------------------------------------------------


def _model(args: argparse.Namespace) -> tuple[Any, str | None]:
    from nanoseek.config import ConfigError, ModelConfig, get_preset

    if getattr(args, "config", None):
        return ModelConfig.load(args.config), args.config
    if getattr(args, "preset", None):
        cfg = get_preset(args.preset)
        if not isinstance(cfg, ModelConfig):  # V4: only `compute context` reads it
            raise ConfigError(f"preset {args.preset!r} is DeepSeek-V4: use `compute context`")
        return cfg, args.preset
    return None, None


def _gpu(args: argparse.Namespace) -> Any:
    from nanoseek.compute import find_gpu, load_catalog

    return find_gpu(args.gpu, load_catalog(args.gpu_file))


def cmd_train(args: argparse.Namespace) -> int:
    from nanoseek.compute import estimate_training

    cfg, name = _model(args)
    r = estimate_training(
        cfg, args.tokens, _gpu(args), args.gpus, args.mfu, args.seq_len, args.precision, args.price
    )
    return _emit(args, {"model": name, **r})


def cmd_check(args: argparse.Namespace) -> int:
    from nanoseek.compute import check_claim

    cfg, name = _model(args)
    r = check_claim(
        cfg, args.tokens, _gpu(args), args.gpu_hours, args.seq_len, args.precision, args.price
    )
    return _emit(args, {"model": name, **r})


def cmd_fleet(args: argparse.Namespace) -> int:
    from nanoseek.compute import fleet_capacity

    cfg, name = _model(args)
    r = fleet_capacity(
        _gpu(args),
        args.gpus,
        args.days,
        args.mfu,
        cfg,
        args.seq_len,
        args.precision,
        args.tokens_per_param,
        args.price,
    )
    return _emit(args, {"model": name, **r} if name else r)


def cmd_memory(args: argparse.Namespace) -> int:
    from nanoseek.compute import training_memory

    cfg, name = _model(args)
    gpu = _gpu(args) if args.gpu else None
    r = training_memory(
        cfg,
        args.gpus,
        args.ep,
        args.seq_len,
        args.micro_batch,
        args.parallel,
        gpu,
        args.optim_states,
    )
    r["note"] = (
        "Activations are an estimate of what each block keeps for its backward; 'recomputed' "
        "is with activation checkpointing per block, which nanoseek does not do yet. "
        "Experts are split over --ep GPUs and replicated over the rest (not sharded)."
    )
    return _emit(args, {"model": name, **r})


def cmd_run(args: argparse.Namespace) -> int:
    from nanoseek.compute import load_catalog, run_report

    r = run_report(args.run_dir, load_catalog(args.gpu_file), args.mfu, args.precision)
    if args.json:
        return _emit(args, r)
    per_gpu = {k: r.pop(k) for k in list(r) if k.endswith(("_gpu_hours", "_cost_usd"))}
    _emit(args, r)
    gpus = [k.removesuffix("_gpu_hours") for k in per_gpu if k.endswith("_gpu_hours")]
    print(
        f"\nthe same {_fmt('total_flops', r['total_flops'])} at {r['assumed_mfu_on_gpus']:.0%} MFU "
        f"({args.precision.upper()}) on one GPU of each kind:"
    )
    print(
        format_table(
            [("GPU", "GPU-hours", "cost")]
            + [
                (g, f"{per_gpu[g + '_gpu_hours']:.3g}", _fmt("cost_usd", per_gpu[g + "_cost_usd"]))
                for g in gpus
            ]
        )
    )
    return 0


def cmd_flops(args: argparse.Namespace) -> int:
    from nanoseek.compute import flops_breakdown, six_n_flops_per_token
    from nanoseek.config import param_counts
    from nanoseek.utils import human

    cfg, name = _model(args)
    parts = flops_breakdown(cfg, args.seq_len)
    total = sum(parts.values())
    ref = six_n_flops_per_token(cfg, args.seq_len)
    counts = param_counts(cfg)
    if args.json:
        flat = {f"flops_{k}": v for k, v in parts.items()}
        return _emit(
            args,
            {
                "model": name,
                "seq_len": args.seq_len,
                "params_total": counts["total"],
                "params_activated": counts["activated"],
                "flops_per_token": total,
                "flops_per_token_forward": total / 3,
                **flat,
                **ref,
            },
        )
    print(
        f"{name}: {human(counts['total'])} parameters, {human(counts['activated'])} activated; "
        f"training FLOPs per token at seq_len {args.seq_len}"
    )
    rows = [("component", "forward", "training", "share")]
    rows += [(k, f"{v / 3:.4g}", f"{v:.4g}", f"{v / total:.1%}") for k, v in parts.items() if v]
    rows += [
        ("total", f"{total / 3:.4g}", f"{total:.4g}", "100%"),
        ("6 N_activated", "", f"{ref['six_n']:.4g}", f"{ref['six_n'] / total:.1%}"),
        (
            "6 N + attention",
            "",
            f"{ref['six_n_plus_attention']:.4g}",
            f"{ref['six_n_plus_attention'] / total:.1%}",
        ),
    ]
    print(format_table(rows))
    return 0


def _any_model(spec: str, is_path: bool) -> Any:
    from nanoseek.config import ModelConfig, V4Config, get_any_preset
    from nanoseek.utils import read_json

    if not is_path:
        return get_any_preset(spec)
    from pathlib import Path

    from nanoseek.config import ConfigError

    path = Path(spec)
    path = path / "config.json" if path.is_dir() else path
    if not path.exists():
        raise ConfigError(f"{path}: no config.json here")
    d = read_json(path, "a model config", ConfigError)
    if d.get("model_type") == "deepseek_v4":
        return V4Config.from_hf_dict(d, str(path))
    return ModelConfig.from_hf_dict(d, str(path))


def _ctx_label(n: int) -> str:
    """4096 -> 4K, 1048576 -> 1M (binary, as context lengths are named); else as is."""
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n:,}"


def cmd_context(args: argparse.Namespace) -> int:
    from nanoseek.compute import FAMILY, context_costs, family_ratio, plot_family
    from nanoseek.utils import human

    specs = [(p, False) for p in (args.preset or [])] + [(c, True) for c in (args.config or [])]
    if not specs:
        specs = [(p, False) for p in FAMILY]
    models = [(spec, _any_model(spec, is_path)) for spec, is_path in specs]
    contexts = [int(c) for c in (args.context or [4096, 131072, 1 << 20])]
    ref = None if args.vs == "none" else _any_model(args.vs, False)
    rows: list[dict[str, Any]] = []
    for L in contexts:
        for name, cfg in models:
            r = context_costs(cfg, L, args.kv_format, name)
            if ref is not None:
                ratio = family_ratio(cfg, ref, L, args.kv_format)
                r[f"flops_vs_{args.vs}"] = ratio["flops_ratio"]
                r[f"kv_cache_vs_{args.vs}"] = ratio["kv_cache_ratio"]
            rows.append(r)
    if args.plot:
        presets = tuple(spec for spec, is_path in specs if not is_path)
        plot_family(args.plot, presets or FAMILY, args.kv_format, max(max(contexts), 1 << 20))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    head = [
        "context",
        "model",
        "params",
        "active",
        "GFLOP/token",
        "attn+index",
        "KV cache",
        "KV/token",
    ]
    if ref is not None:
        head += [f"FLOPs vs {args.vs}", f"KV vs {args.vs}"]
    table = [tuple(head)]
    for r in rows:
        row = [
            _ctx_label(r["context"]),
            r["model"],
            human(r["params_total"]),
            human(r["params_activated"]),
            f"{r['flops_per_token'] / 1e9:,.1f}",
            f"{(r['flops_attention'] + r['flops_indexer']) / r['flops_per_token']:.0%}",
            f"{r['kv_cache_bytes'] / 2**30:,.2f} GiB",
            f"{r['kv_cache_bytes_per_token'] / 1024:,.1f} KiB",
        ]
        if ref is not None:
            row += [f"{r[f'flops_vs_{args.vs}']:.1%}", f"{r[f'kv_cache_vs_{args.vs}']:.1%}"]
        table.append(tuple(row))
    print(format_table(table))
    print(
        f"decode, one sequence: forward FLOPs of one new token with `context` tokens cached "
        f"(2 x activated parameters + attention + indexer); KV cache in {args.kv_format}"
    )
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def cmd_gpus(args: argparse.Namespace) -> int:
    from nanoseek.compute import load_catalog, this_machine

    gpus = list(load_catalog(args.gpu_file).values()) + ([this_machine()] if args.measure else [])
    if args.json:
        print(
            json.dumps(
                [{k: v for k, v in g.__dict__.items() if k != "aliases"} for g in gpus], indent=2
            )
        )
        return 0
    rows = [("GPU", "name", "BF16 TF", "FP8 TF", "memory GB", "TB/s", "$/GPU-h")]
    for g in gpus:
        rows.append(
            (
                g.key,
                g.name,
                f"{g.bf16_flops / 1e12:.4g}",
                f"{g.fp8_flops / 1e12:.4g}" if g.fp8_flops else "-",
                f"{g.memory_gb:.0f}" if g.memory_gb else "-",
                f"{g.bandwidth_tbs:.3g}" if g.bandwidth_tbs else "-",
                f"{g.price_usd_per_hour:.2f}",
            )
        )
    print(format_table(rows))
    print("dense tensor-core peaks (half the vendors' sparsity headline); prices are defaults")
    if args.sources:
        for g in gpus:
            print(f"\n{g.key}: {g.source}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from nanoseek.compute import check_claim, find_gpu, load_catalog, plot_cost
    from nanoseek.config import get_preset

    catalog = load_catalog(args.gpu_file)
    gpus = tuple(find_gpu(g, catalog) for g in (args.gpu or ["H100", "A100"]))
    claim = check_claim(get_preset("deepseek-v3"), 14.8e12, find_gpu("H800", catalog), 2.788e6)
    marker = {
        "params": claim["params_activated"],
        "gpu_hours": claim["gpu_hours"],
        "cost_usd": claim["cost_usd"],
        "label": "DeepSeek-V3 claim: 2.788M H800-h, 14.8T tokens",
    }
    out = plot_cost(args.out, gpus, args.mfu, args.tokens_per_param, args.precision, marker)
    print(f"wrote {out}")
    return 0


# --- output --------------------------------------------------------------------------------


def _fmt(key: str, v: Any) -> str:
    from nanoseek.utils import human

    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if "mfu" in key:
        return f"{v:.1%}"
    if "cost_usd" in key or key.startswith("price"):
        return f"${v:,.2f}" if v < 100 else f"${v:,.0f}"
    if key.endswith("_gb"):
        return f"{v:,.2f} GB"
    if key.startswith(("params", "optimal_params")):
        return human(v)
    if "flops" in key:
        rate = key.endswith(("_per_s", "_per_gpu")) or key.startswith(("peak", "achieved"))
        return f"{human(v, 4)} FLOP" + ("/s" if rate else "")
    if key.startswith("tokens") or key.endswith("tokens") or key == "gpu_hours":
        return human(v, 4)
    if isinstance(v, float) and not v.is_integer():
        return f"{v:,.1f}"
    return f"{int(v):,}"


def _emit(args: argparse.Namespace, r: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    prose = {k: r.pop(k) for k in ("explanation", "note") if k in r}
    print(format_table([(k.replace("_", " "), _fmt(k, v)) for k, v in r.items()]))
    for text in prose.values():
        print("\n" + textwrap.fill(text, width=90))
    return 0
