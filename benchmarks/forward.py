"""Forward and forward+backward throughput: nanoseek versus transformers' DeepSeek-V3.

Same config (the `small` preset by default), same weights, same batch, in one run, fp32 and
bf16 autocast. Timings alternate between the two implementations so machine noise hits both.

    python -m benchmarks.forward [--preset small] [--batch 8] [--seq 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from contextlib import nullcontext

import torch

import nanoseek
from benchmarks.timing import median_seconds
from nanoseek.compute import flops_per_token, measure_matmul_peak
from nanoseek.config import get_preset
from nanoseek.utils import format_table


def timed(fn, repeats: int) -> float:
    return median_seconds(fn, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", default="fp32,bf16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import DeepseekV3ForCausalLM

    cfg = get_preset(args.preset)
    torch.manual_seed(0)
    ours = nanoseek.Transformer(cfg)
    with tempfile.TemporaryDirectory() as d:
        nanoseek.save_pretrained(ours, d)
        ref = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    tokens = ids.numel()
    with torch.no_grad():  # same weights, same numbers
        diff = (ours.eval()(ids).logits - ref.eval()(ids).logits).abs().max().item()

    def fwd(model, hf):
        def run():
            with torch.no_grad():
                model(ids) if hf else model(ids, mtp_weight=0.0)

        return run

    def fwd_bwd(model, hf):
        def run():
            if hf:
                loss = model(ids, labels=ids).loss
            else:  # MTP off so both do the same work
                loss = model(ids, targets=torch.roll(ids, -1, 1), mtp_weight=0.0).loss
            loss.backward()
            model.zero_grad(set_to_none=True)

        return run

    fl_fwd = flops_per_token(cfg.replace(num_nextn_predict_layers=0), args.seq, training=False)
    rows = []
    for name in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        peak = measure_matmul_peak(dtype)
        ctx = (
            (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if name == "bf16" else nullcontext
        )
        for mode, make, mult in (("forward", fwd, 1), ("fwd+bwd", fwd_bwd, 3)):
            for m in (ours, ref):
                m.train(mode != "forward")
            runs = {"nanoseek": make(ours, False), "transformers": make(ref, True)}
            with ctx():
                for r in runs.values():  # warm up
                    r()
                samples = {k: [] for k in runs}
                for _ in range(args.repeats):
                    for k, r in runs.items():
                        samples[k].append(timed(r, 1))
            t = {k: statistics.median(v) for k, v in samples.items()}
            for k in runs:
                tps = tokens / t[k]
                rows.append(
                    (name, mode, k, tps, tps * fl_fwd * mult / peak, t["transformers"] / t[k], peak)
                )
    # the MoE layer alone (gate + dispatch + experts), same weights, fp32 forward
    layer = next(i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i))
    our_moe, ref_moe = ours.layers[layer].ffn.eval(), ref.model.layers[layer].mlp.eval()
    h = torch.randn(args.batch, args.seq, cfg.hidden_size)
    with torch.no_grad():
        moe_diff = (our_moe(h) - ref_moe(h)).abs().max().item()
        moe_t = {
            k: statistics.median([timed(lambda f=f: f(h), 1) for _ in range(args.repeats)])
            for k, f in (("nanoseek", our_moe), ("transformers", ref_moe))
        }

    print(
        f"\nforward benchmark: preset={args.preset} batch={args.batch} seq={args.seq} "
        f"threads={args.threads}; max |logit diff| vs transformers (fp32) = {diff:.2e}"
    )
    table = [
        (f"{name} {mode} {k}", f"{tps:.0f}", f"{frac:.1%}", f"{ratio:.2f}x", f"{peak / 1e9:.0f}")
        for name, mode, k, tps, frac, ratio, peak in rows
    ]
    header = (
        "dtype, pass, implementation",
        "tokens/s",
        "% of peak",
        "vs transformers",
        "peak GFLOP/s",
    )
    print(format_table(table, header=header))
    print(
        f"\nMoE layer {layer} alone (fp32 forward, {tokens} tokens, max diff {moe_diff:.1e}): "
        f"nanoseek {tokens / moe_t['nanoseek']:.0f} tok/s, transformers "
        f"{tokens / moe_t['transformers']:.0f} tok/s, "
        f"ratio {moe_t['transformers'] / moe_t['nanoseek']:.2f}x"
    )


if __name__ == "__main__":
    main()
