"""A short, self-contained check of the accelerator path: bf16 training steps and generation.

Meant for a lent GPU (one command, a few minutes), runnable on CPU too:

    python -m benchmarks.device_check [--device cuda] [--presets small,dense-small]
                                      [--batch 16] [--seq 512] [--steps 20] [--compile]

It reports, in one table: for each preset, training tokens/s and MFU (bf16 autocast, fused
loss, AdamW) against the catalog's peak for the detected GPU (or this CPU's measured peak) and
whether the loss fell; for a MoE preset on CUDA, its step again with the experts in the
per-expert loop (`moe.GPU_GROUPED` off) against the grouped GEMMs, and the two paths' outputs
and gradients on one MoE layer; with --compile, each preset's step under torch.compile too
(and its first step, the compilation); then decode on the first preset: absorbed path equal
to the plain path (max logit difference), greedy speculative output equal to plain greedy,
and decode tokens/s at batch 1 and 8, with fp32 and with bf16 weights.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch

from nanoseek.compute import find_gpu, flops_per_token, load_catalog, measure_matmul_peak
from nanoseek.config import get_preset
from nanoseek.infer import Engine, SamplingParams
from nanoseek.model import Transformer
from nanoseek.model import moe as moe_module
from nanoseek.model.moe import MoE
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


def train_check(model, device, batch, seq, steps, compiled=False) -> dict[str, float]:
    """Steps of bf16 training on a learnable pattern -> tokens/s (median step after the
    first two: a compiled model compiles in them), FLOP/s, first and last loss, and the first
    step's seconds (with `compiled`, the compilation's)."""
    cfg = model.config
    step_model = torch.compile(model) if compiled else model
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
            loss = step_model(inputs, targets=targets, mtp_weight=0.3).loss
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
        "first_step_s": times[0],
    }


def parity_check(device: torch.device) -> float | None:
    """Max |logit difference| against `transformers`' DeepseekV3ForCausalLM on the same
    random weights (`tiny` without MTP, written by `save_pretrained`; fp32, TF32 off), on
    `device`; None without `transformers`."""
    try:
        import transformers
    except ImportError:
        return None
    import nanoseek

    torch.manual_seed(0)
    ours = Transformer(get_preset("tiny").replace(num_nextn_predict_layers=0)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        nanoseek.save_pretrained(ours, tmp)
        ref = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp).eval()
    ref, ours = ref.to(device), ours.to(device)
    ids = torch.randint(0, ours.config.vocab_size, (3, 40), device=device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            return (ours(ids).logits - ref(ids).logits).abs().max().item()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def experts_check(model, device, tokens: int) -> float:
    """Largest difference, relative to the largest value, between the grouped-GEMM and the
    per-expert-loop experts (`Experts.grouped` vs `Experts.sorted`) in bf16 on one MoE
    layer: output and the gradients of input, gate weights and expert weights."""
    layer = next(m for m in model.modules() if isinstance(m, MoE))
    ex = layer.experts
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, ex.w13.shape[2], device=device, generator=g)
    probe = torch.randn(x.shape, device=device, generator=g)
    with torch.no_grad():
        weights, indices, _ = layer.gate(x)

    def run(path: str) -> list[torch.Tensor]:
        xg, wg = x.clone().requires_grad_(), weights.clone().requires_grad_()
        ex.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = getattr(ex, path)(xg, wg, indices)
        (y.float() * probe).sum().backward()
        out = [y.float(), xg.grad, wg.grad, ex.w13.grad.clone(), ex.w2.grad.clone()]
        ex.zero_grad(set_to_none=True)
        return out

    grouped, loop = run("grouped"), run("sorted")
    return max(
        ((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grouped, loop, strict=True)
    )


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
    # bf16 weights too: at batch 8 their MoE layers take the grouped GEMMs on CUDA
    half = Engine(copy.deepcopy(model).to(torch.bfloat16), max_batch=8, max_len=256)
    for n in (1, 8):
        out[f"decode_tok_s_batch{n}"] = decode_rate(fast, device, prompts[:n])
        out[f"decode_bf16_tok_s_batch{n}"] = decode_rate(half, device, prompts[:n])
    return out


def decode_rate(engine: Engine, device: torch.device, prompts: list[list[int]]) -> float:
    """Greedy tokens/s over 128 new tokens for every prompt, after a short warm-up."""
    engine.generate(prompts, SamplingParams(max_tokens=4, temperature=0))
    sync(device)
    t0 = time.perf_counter()
    engine.generate(prompts, SamplingParams(max_tokens=128, temperature=0, ignore_eos=True))
    sync(device)
    return len(prompts) * 128 / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--presets", default="small,dense-small", help="comma-separated")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument(
        "--compile", action="store_true", help="add each preset's step under torch.compile"
    )
    args = ap.parse_args()
    if args.steps < 3:
        raise SystemExit("--steps must be at least 3 (the first two are not timed)")
    device = torch.device(args.device)
    presets = args.presets.split(",")
    peak, peak_src = peak_flops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"\ndevice check: {name}, batch {args.batch} x {args.seq}, torch {torch.__version__}, "
        f"MFU against {peak_src} ({peak / 1e12:.0f} TFLOP/s)",
        flush=True,
    )
    rows, rates, first = [], {}, None
    diff = parity_check(device)
    parity = "transformers not installed" if diff is None else f"{diff:.2e}"
    rows.append(("logits vs transformers DeepSeek-V3 (fp32, `tiny`), max diff", parity))
    print(format_table(rows), flush=True)
    for preset in presets:
        torch.manual_seed(0)
        model = Transformer(get_preset(preset)).to(device)
        if first is None:  # decode runs on the first preset
            first = model
        is_moe = any(isinstance(m, MoE) for m in model.modules())
        grouped = moe_module.GPU_GROUPED
        paths = [("", grouped, False)]  # (label, experts as grouped GEMMs, compiled)
        if is_moe and device.type == "cuda" and grouped:
            paths.append((", experts in the per-expert loop", False, False))
            err = experts_check(model, device, args.batch * args.seq)
            rows.append((f"{preset}: grouped vs loop experts, max rel diff (bf16)", f"{err:.2e}"))
        if args.compile:
            paths.append((", torch.compile", grouped, True))
        for label, grouped_path, compiled in paths:
            moe_module.GPU_GROUPED = grouped_path
            try:
                t = train_check(model, device, args.batch, args.seq, args.steps, compiled)
            finally:
                moe_module.GPU_GROUPED = grouped
            rates[preset + label] = t["tokens_per_s"]
            rows += [
                (f"{preset}{label}: train tokens/s (bf16, MTP on)", f"{t['tokens_per_s']:,.0f}"),
                (f"{preset}{label}: MFU", f"{t['flops_per_s'] / peak:.1%}"),
                (
                    f"{preset}{label}: loss, step 1 -> {args.steps}",
                    f"{t['first_loss']:.3f} -> {t['last_loss']:.3f}",
                ),
            ]
            if compiled:
                rows.append(
                    (f"{preset}{label}: first step (compiling)", f"{t['first_step_s']:.1f} s")
                )
            print(format_table(rows[-4 if compiled else -3 :]), flush=True)
    if len(presets) > 1 and presets[0] in rates and presets[1] in rates:
        rows.append(
            (
                f"{presets[0]} tokens/s / {presets[1]}'s",
                f"{rates[presets[0]] / rates[presets[1]]:.2f}x",
            )
        )
    d = decode_check(first, device)
    rows += [
        (
            f"{presets[0]}: absorbed vs plain, max logit diff (fp32 weights)",
            f"{d['absorbed_vs_plain_max_diff']:.2e}",
        ),
        ("greedy: absorbed == plain", "yes" if d["greedy_same"] else "NO"),
        ("greedy: speculative == plain", "yes" if d.get("speculative_same", 1.0) else "NO"),
        (
            "decode tokens/s, batch 1 / 8",
            f"{d['decode_tok_s_batch1']:,.0f} / {d['decode_tok_s_batch8']:,.0f}",
        ),
        (
            "decode tokens/s, bf16 weights, batch 1 / 8",
            f"{d['decode_bf16_tok_s_batch1']:,.0f} / {d['decode_bf16_tok_s_batch8']:,.0f}",
        ),
    ]
    print()
    print(format_table(rows))


if __name__ == "__main__":
    main()
