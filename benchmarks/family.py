"""The DeepSeek family at toy scale (issue 12): V3, V3.2 and V4 models of equal activated
parameters (`small`, `small-v32`, `small-v4`: ~9.2M each), the same token budget on the same
data and batches, on CPU. Per model: validation loss, training tokens/s, and at each context
(2K and 8K by default) forward and decode tokens/s of nanoseek and of `transformers` on the
same trained weights, and the cache bytes per token.

    python -m benchmarks.family [--tokens 2e5] [--data data/stdlib-8k] [--out runs/family]
        [--contexts 2048,8192] [--decode-tokens 16] [--threads 2] [--png docs/family.png]

Cost: in a 2-step check on one (shared) CPU thread, training ran at ~600 (small), ~170
(small-v32) and ~185 (small-v4) tokens/s at seq 512, so 2e5 tokens is ~6, ~20 and ~18
minutes; the 8K speed columns add several minutes per model (see Time below).

Smoke run (seconds, on a small corpus): --presets tiny,tiny-v32,tiny-v4 --tokens 4096
--seq-len 64 --contexts 128,256 --decode-tokens 3.

What is measured, honestly:
- Training: `nanoseek train` with the same recipe for all three, MTP off (V4 has no MTP
  module here), the V3.2 and V4 indexers trained by their KL beside the LM loss (each
  costs an extra forward without gradient), no V3.2 dense warm-up.
- Forward: one sequence of `context` tokens, logits for every position, no gradient.
- Decode, batch 1, `context` tokens of prompt, greedy, tokens/s after the first: nanoseek's
  engine for all three (V3 / V3.2: absorbed MLA over the latent cache, V3.2 with its
  indexer-key cache; V4: its window + compressed-entry cache, infer/cache_v4.py).
  transformers decodes all three with its cache (`generate(use_cache=True)`).
- Time: transformers' V4 attention is dense over window + entries, masked: one 8K forward
  of `small-v4` takes ~90 s on one thread (~5 GB); ours goes by query blocks (~10 s; the
  prefill is the same computation). Expect several minutes per model at 8K. A measurement
  that fails (memory) is printed and left out.
- Cache bytes per token: the engine's cache for one sequence of `context` tokens, bf16,
  read off its tensors (`bytes_per_token`): V3 latent rows, V3.2 latent + indexer keys, V4
  window rings + compressed entries + indexer keys + the compressors' pending windows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import timing
from nanoseek.config import V4Config, any_param_counts, get_preset
from nanoseek.data import BatchLoader, prepare
from nanoseek.hub import from_pretrained
from nanoseek.infer import KVCache, V4Cache
from nanoseek.model import Transformer, V4Transformer
from nanoseek.train import make_config, train
from nanoseek.train.metrics import read_metrics
from nanoseek.utils import format_table, human

PRESETS = ("small", "small-v32", "small-v4")


def train_models(args: argparse.Namespace, shards: Path) -> dict[str, dict[str, Any]]:
    """Each preset trained on the same shards, batches and budget -> its summary."""
    out = {}
    for preset in args.presets:
        print(f"\n== training {preset}: {human(args.tokens)} tokens", flush=True)
        tc = make_config(
            preset=preset,
            data=str(shards),
            out=str(Path(args.out) / preset),
            tokens=args.tokens,
            seq_len=args.seq_len,
            eval_every=args.eval_every,
            mtp_weight=0.0,  # V4 has no MTP module: compare the main models
            threads=args.threads,
            seed=args.seed,
            overwrite=True,
            progress=False,
        )
        out[preset] = train(tc)
    return out


def val_curve(run: Path) -> tuple[list[float], list[float]]:
    """(training tokens, validation loss) at each evaluation of a run."""
    recs = [r for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]
    return [r["tokens"] for r in recs], [r["val_loss"] for r in recs]


def median_seconds(fn, repeats: int, warm_up=None) -> float:
    """Median wall time of fn() after one call of `warm_up` (default fn itself; at 8K tokens
    a cheap short call saves minutes)."""
    (warm_up or fn)()
    return timing.median_seconds(fn, repeats)


def with_context(model: Transformer | V4Transformer, n: int) -> None:
    """Let the model run n positions (the engine checks max_position_embeddings): only the
    cost is measured past the trained length."""
    cfg = model.config
    model.config = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, n))


@torch.inference_mode()
def ours_decode(model: Transformer | V4Transformer, ids: torch.Tensor, n: int) -> float:
    """Decode tokens/s after the first token, batch 1: the engine (its V4 cache for V4)."""
    from benchmarks.decode import ns_run
    from nanoseek.infer import Engine

    engine = Engine(model, max_batch=1, max_len=ids.shape[1] + n + 8)
    return ns_run(engine, ids.tolist(), n)[1]


@torch.inference_mode()
def hf_decode(hf, ids: torch.Tensor, n: int) -> float:
    """transformers' cached greedy decode: tokens/s after the first token, batch 1."""
    kw = dict(do_sample=False, use_cache=True, pad_token_id=0)
    hf.generate(ids[:, -8:], max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
    t0 = time.perf_counter()
    hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
    return (n - 1) / max(time.perf_counter() - t0 - first, 1e-9)


def speed_rows(
    preset: str, ckpt: Path, prompt: torch.Tensor, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Forward / decode tokens/s (nanoseek and transformers) and cache bytes per token at
    each context, on the trained checkpoint."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # our checkpoints' MTP layers: "unexpected" to it
    hf_logging.disable_progress_bar()
    ours = from_pretrained(ckpt).eval()
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    rows = []
    for ctx in args.contexts:
        ids = prompt[:, :ctx]
        with_context(ours, ctx + args.decode_tokens + 8)
        row: dict[str, Any] = {"preset": preset, "context": ctx}
        kw = {"mtp_weight": 0.0} if isinstance(ours, Transformer) else {}
        row["fwd_ours"] = attempt(forward_rate, ours, ids, args.repeats, **kw)
        row["fwd_hf"] = attempt(forward_rate, hf, ids, args.repeats)
        row["decode_ours"] = attempt(ours_decode, ours, ids, args.decode_tokens)
        row["decode_hf"] = attempt(hf_decode, hf, ids, args.decode_tokens)
        row["cache_bytes_per_token"] = cache_bytes_per_token(ours.config, ctx)
        rows.append(row)
        print(f"{preset} @ {ctx}: {row}", flush=True)
    return rows


def cache_bytes_per_token(cfg, ctx: int) -> int:
    """The engine's cache for one sequence of ctx tokens, bf16, on the meta device (sizes
    only): bytes per token, off its tensors."""
    cache = V4Cache if isinstance(cfg, V4Config) else KVCache
    return cache(cfg, 1, ctx, torch.bfloat16, "meta").bytes_per_token()


def forward_rate(model, ids: torch.Tensor, repeats: int, **kw: Any) -> float:
    """Forward tokens/s over one sequence (every position's logits), warmed up on 64 tokens."""
    return ids.shape[1] / median_seconds(
        lambda: model(ids, **kw).logits, repeats, lambda: model(ids[:, :64], **kw).logits
    )


@torch.inference_mode()
def attempt(measure, *args: Any, **kw: Any) -> float | None:
    """measure(*args, **kw), or None (printed) when it runs out of memory or fails: one
    failed column must not lose the other numbers of a long run."""
    try:
        return measure(*args, **kw)
    except (RuntimeError, MemoryError) as e:
        print(f"  measurement failed: {str(e).splitlines()[0][:200]}", flush=True)
        return None


def _rate(x: float | None, digits: int = 0) -> str:
    return "failed" if x is None else f"{x:,.{digits}f}"


def prompt_tokens(shards: Path, n: int, seed: int) -> torch.Tensor:
    """[1, n] token ids of real text (validation split if it is long enough, else train)."""
    for split in ("val", "train"):
        try:
            return BatchLoader(shards, split, 1, n, seed).get_batch(0)[0]
        except Exception:  # too short: the next split
            continue
    raise SystemExit(f"{shards}: fewer than {n + 1} tokens in either split")


def print_tables(summaries: dict, rows: list[dict], args: argparse.Namespace) -> None:
    train_rows = []
    for preset, s in summaries.items():
        pc = any_param_counts(get_preset(preset))
        train_rows.append(
            (
                preset,
                human(pc["total"]),
                human(pc["activated"]),
                human(s["flops_per_token"]),
                f"{s['tokens_per_second']:,.0f}",
                f"{s['final_val_loss']:.4f}",
                f"{s['final_val_bpb']:.3f}",
            )
        )
    header = ("", "params", "active", "FLOPs/tok", "train tok/s", "val loss", "bits/byte")
    print(f"\nSame data, batches and {human(args.tokens)}-token budget, seq {args.seq_len}:")
    print(format_table(train_rows, header=header))
    ctx_rows = [
        (
            r["preset"],
            f"{r['context']:,}",
            _rate(r["fwd_ours"]),
            _rate(r["fwd_hf"]),
            f"{r['fwd_ours'] / r['fwd_hf']:.2f}x" if r["fwd_ours"] and r["fwd_hf"] else "",
            _rate(r["decode_ours"], 2),
            _rate(r["decode_hf"], 2),
            f"{r['cache_bytes_per_token']:,.0f}",
        )
        for r in rows
    ]
    header = (
        "",
        "context",
        "fwd tok/s",
        "hf fwd tok/s",
        "fwd vs hf",
        "decode tok/s",
        "hf decode tok/s",
        "cache B/token",
    )
    print(f"\nBatch 1, fp32, {args.threads} thread(s); decode: {args.decode_tokens} new tokens:")
    print(format_table(ctx_rows, header=header))
    print(
        "Decode: each engine from its own cache (V4: window + compressed entries), "
        "transformers from its cache. Cache bytes: the engine's cache at that context, "
        "bf16, off its tensors."
    )


def plot(summaries: dict, rows: list[dict], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, preset in enumerate(summaries):
        color = f"C{i}"
        tokens, val = val_curve(Path(args.out) / preset)
        axes[0].plot(tokens, val, "o-", ms=3, color=color, label=preset)
        mine = [r for r in rows if r["preset"] == preset]
        ctx = [r["context"] for r in mine]
        axes[1].plot(
            ctx, [r["decode_ours"] for r in mine], "o-", color=color, label=f"{preset} nanoseek"
        )
        axes[1].plot(
            ctx, [r["decode_hf"] for r in mine], "s--", color=color, label=f"{preset} transformers"
        )
        axes[2].plot(
            ctx, [r["cache_bytes_per_token"] for r in mine], "o-", color=color, label=preset
        )
    axes[0].set(xlabel="training tokens", ylabel="validation loss (nats/token)")
    axes[1].set(xlabel="context (tokens)", ylabel="decode tokens/s, batch 1", yscale="log")
    axes[2].set(xlabel="context (tokens)", ylabel="cache bytes per token (bf16)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[1:]:
        ax.set_xscale("log", base=2)
    active = "/".join(human(any_param_counts(get_preset(p))["activated"]) for p in summaries)
    names = " / ".join(summaries)
    fig.suptitle(f"{names}: {active} activated, {human(args.tokens)} tokens each, CPU")
    fig.tight_layout()
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=110)
    print(f"plot: {args.png}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--presets", default=",".join(PRESETS), help="V3, V3.2, V4 presets")
    ap.add_argument("--tokens", type=float, default=2e5, help="training tokens per model")
    ap.add_argument("--seq-len", type=int, default=512, help="training sequence length")
    ap.add_argument("--data", default="data/stdlib-8k", help="shards (built from stdlib if absent)")
    ap.add_argument("--out", default="runs/family")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--contexts", default="2048,8192", help="contexts for the speed columns")
    ap.add_argument("--decode-tokens", type=int, default=16, help="new tokens per decode run")
    ap.add_argument("--repeats", type=int, default=1, help="forward timings (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--png", default="docs/family.png")
    args = ap.parse_args(argv)
    args.presets = args.presets.split(",")
    args.contexts = [int(c) for c in args.contexts.split(",")]
    if args.decode_tokens < 2:
        ap.error("--decode-tokens must be >= 2 (the first token is timed apart)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    shards = data if (data / "meta.json").exists() else prepare("stdlib", data)
    summaries = train_models(args, shards)
    torch.set_num_threads(args.threads)  # train() restores the thread count it found
    prompt = prompt_tokens(shards, max(args.contexts), args.seed)
    rows = []
    for preset in args.presets:
        rows += speed_rows(preset, Path(args.out) / preset / "ckpt", prompt, args)
    print_tables(summaries, rows, args)
    result = {"summaries": summaries, "contexts": rows, "args": vars(args)}
    (Path(args.out) / "family.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(summaries, rows, args)
    return result


if __name__ == "__main__":
    main()
