"""A short, self-contained check of the accelerator path: bf16 training steps and generation.

Meant for a lent GPU (one command, a few minutes), runnable on CPU too:

    python -m benchmarks.device_check [--device cuda] [--preset small] [--steps 20]

It reports, in one table: training tokens/s and MFU (bf16 autocast, fused loss, AdamW) against
the catalog's peak for the detected GPU (or this CPU's measured peak), whether the loss fell;
then decode on the same model: absorbed path equal to the plain path (max logit difference),
greedy speculative output equal to plain greedy, and decode tokens/s at batch 1 and 8.
"""

from __future__ import annotations

import argparse
import time

import torch

from nanoseek.compute import find_gpu, flops_per_token, load_catalog, measure_matmul_peak
from nanoseek.config import get_preset
from nanoseek.infer import Engine, SamplingParams
from nanoseek.model import Transformer
from nanoseek.utils import format_table


def peak_flops(device: torch.device) -> tuple[float, str]:
    if device.type != "cuda":
        return measure_matmul_peak(torch.bfloat16, "cpu"), "this CPU, measured"
    name = torch.cuda.get_device_name(device)
    catalog = load_catalog()
    for key in sorted(catalog, key=len, reverse=True):  # "H200" before "H20"
        if key.lower() in name.lower().replace(" ", ""):
            gpu = find_gpu(key, catalog)
            return gpu.bf16_flops, f"{gpu.name} catalog bf16 peak"
    return measure_matmul_peak(torch.bfloat16, "cuda"), f"{name}, measured"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_check(model, device, batch, seq, steps) -> dict[str, float]:
    cfg = model.config
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), fused=True)
    # a learnable signal: each sequence repeats a random 32-token pattern
    g = torch.Generator().manual_seed(0)
    pattern = torch.randint(0, cfg.vocab_size, (batch, 32), generator=g)
    x = pattern.repeat(1, seq // 32 + 2)[:, : seq + 1].to(device)
    inputs, targets = x[:, :-1], x[:, 1:]
    losses, times = [], []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(inputs, targets=targets, mtp_weight=0.3).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    step_s = sorted(times[2:])[len(times[2:]) // 2]
    tps = batch * seq / step_s
    return {
        "tokens_per_s": tps,
        "flops_per_s": tps * flops_per_token(cfg, seq),
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def decode_check(model, device) -> dict[str, float]:
    model.eval()
    prompts = [[1 + i, 7, 3 + i, 9] for i in range(8)]
    greedy = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    fast = Engine(model, max_batch=8, max_len=256)
    plain = Engine(model, max_batch=8, max_len=256, plain=True)
    a = [c.token_ids for c in fast.generate(prompts, greedy)]
    b = [c.token_ids for c in plain.generate(prompts, greedy)]
    ids = torch.tensor(prompts, device=device)
    pos = torch.arange(4, device=device).expand(8, 4)
    ha, hp = fast.runner.forward(ids, pos, 0), plain.runner.forward(ids, pos, 0, plain=True)
    diff = (fast.runner.logits(ha) - plain.runner.logits(hp)).abs().max().item()
    out = {"absorbed_vs_plain_max_diff": diff, "greedy_same": float(a == b)}
    if len(model.mtp):
        spec = Engine(model, max_batch=8, max_len=256, speculative=True)
        s = [c.token_ids for c in spec.generate(prompts, greedy)]
        out["speculative_same"] = float(s == a)
    for n in (1, 8):
        long = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
        fast.generate(prompts[:n], SamplingParams(max_tokens=4, temperature=0))  # warm up
        sync(device)
        t0 = time.perf_counter()
        fast.generate(prompts[:n], long)
        sync(device)
        out[f"decode_tok_s_batch{n}"] = n * 128 / (time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = Transformer(get_preset(args.preset)).to(device)
    peak, peak_src = peak_flops(device)
    t = train_check(model, device, args.batch, args.seq, args.steps)
    d = decode_check(model, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"\ndevice check: {name}, preset {args.preset}, batch {args.batch} x {args.seq}, torch {torch.__version__}"
    )
    rows = [
        ("train tokens/s (bf16 autocast, MTP on)", f"{t['tokens_per_s']:,.0f}"),
        (f"train MFU (vs {peak_src}, {peak / 1e12:.0f} TFLOP/s)", f"{t['flops_per_s'] / peak:.1%}"),
        (f"loss, step 1 -> {args.steps}", f"{t['first_loss']:.3f} -> {t['last_loss']:.3f}"),
        (
            "absorbed vs plain, max logit diff (fp32 weights)",
            f"{d['absorbed_vs_plain_max_diff']:.2e}",
        ),
        ("greedy: absorbed == plain", "yes" if d["greedy_same"] else "NO"),
        ("greedy: speculative == plain", "yes" if d.get("speculative_same", 1.0) else "NO"),
        ("decode tokens/s, batch 1", f"{d['decode_tok_s_batch1']:,.0f}"),
        ("decode tokens/s, batch 8", f"{d['decode_tok_s_batch8']:,.0f}"),
    ]
    print(format_table(rows))


if __name__ == "__main__":
    main()
