"""Decode benchmark: nanoseek's engine versus transformers `generate(use_cache=True)`.

    python -m benchmarks.decode [--ckpt PATH] [--train-seconds 60] [--threads 1] [--no-small]

One run, same weights for both (saved with nanoseek, loaded by both): decode tokens/s and
time to first token at batch 1 and 8, KV-cache bytes per token read off the tensors each
holds, absorbed vs plain attention at 2K and 8K tokens of context, MTP speculation on a
trained model, and the machine's memory bandwidth as the physical limit.

Without --ckpt the newest trained checkpoint under runs/ is used (prompts from the stdlib
corpus); failing that, the tiny preset is trained for --train-seconds on a synthetic
second-order corpus (so MTP drafts have something to learn, but not everything). Tiny
numbers say what the engine does where per-op overhead, not arithmetic or bandwidth, sets
the speed; the `small` preset rows (6 layers, hidden 256, random weights) show a size
where reading the weights starts to matter.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import nanoseek
from nanoseek.config import param_counts
from nanoseek.infer import Engine, SamplingParams
from nanoseek.utils import format_table


def synthetic_batch(vocab: int, B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """Two random successor tables; which one follows token t depends on the token before
    it (a second-order rule), with 10% random jumps. A tiny model learns it in a minute,
    but not perfectly, so MTP drafts are right often, not always (a first-order table made
    greedy decoding trivially predictable: 100% acceptance)."""
    g42 = torch.Generator().manual_seed(42)
    succ = torch.stack([torch.randperm(vocab - 2, generator=g42) + 2 for _ in range(2)])
    x = torch.empty(B, T + 1, dtype=torch.long)
    x[:, :2] = torch.randint(2, vocab, (B, 2), generator=gen)
    jumps = torch.rand(B, T, generator=gen) < 0.1
    rand = torch.randint(2, vocab, (B, T), generator=gen)
    for i in range(1, T):
        x[:, i + 1] = torch.where(jumps[:, i], rand[:, i], succ[x[:, i - 1] % 2, x[:, i] - 2])
    return x


def train_tiny(seconds: float) -> nanoseek.Transformer:
    torch.manual_seed(0)
    model = nanoseek.Transformer(nanoseek.get_preset("tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    t0, steps, loss = time.perf_counter(), 0, None
    while time.perf_counter() - t0 < seconds:
        batch = synthetic_batch(model.config.vocab_size, 16, 64, gen)
        out = model(batch[:, :-1], batch[:, 1:], mtp_weight=1.0)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        steps, loss = steps + 1, out
    print(
        f"trained tiny for {steps} steps ({seconds:.0f}s): main loss {loss.main_loss.item():.3f}, "
        f"MTP loss {loss.mtp_losses[0].item():.3f}"
    )
    return model.eval()


def hf_run(hf, prompts: torch.Tensor, n: int) -> tuple[float, float, int]:
    """(time to first token, decode tokens/s, KV bytes per token) for transformers."""
    kw = dict(do_sample=False, use_cache=True, pad_token_id=0)
    with torch.inference_mode():
        hf.generate(prompts, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
        t0 = time.perf_counter()
        hf.generate(prompts, max_new_tokens=1, min_new_tokens=1, **kw)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = hf.generate(
            prompts, max_new_tokens=n, min_new_tokens=n, return_dict_in_generate=True, **kw
        )
        total = time.perf_counter() - t0
    kv = out.past_key_values
    held = sum(t.nbytes for layer in kv.layers for t in (layer.keys, layer.values))
    per_token = held // (prompts.shape[0] * kv.get_seq_length())
    return ttft, prompts.shape[0] * (n - 1) / (total - ttft), per_token


def ns_run(engine: Engine, prompts: list[list[int]], n: int) -> tuple[float, float]:
    sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    engine.generate(
        prompts, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    )  # warm-up
    for p in prompts:
        engine.add_request(p, sp)
    t0 = time.perf_counter()
    engine.step()  # the prefill: every prompt's first token
    ttft = time.perf_counter() - t0
    t1 = time.perf_counter()
    produced = 0
    while engine.has_unfinished():
        produced += sum(len(o.token_ids) for o in engine.step())
    return ttft, produced / (time.perf_counter() - t1)


def long_context(model: nanoseek.Transformer, S: int, steps: int = 20) -> tuple[float, float]:
    """ms per decode step at batch 1 with S cached tokens: absorbed vs plain."""
    cfg = model.config
    # random latents at positions past the trained context: only the cost is measured here
    model.config = cfg.replace(
        max_position_embeddings=max(cfg.max_position_embeddings, S + steps + 1)
    )
    out = []
    for plain in (False, True):
        eng = Engine(model, max_batch=1, max_len=S + steps + 1, plain=plain)
        eng.cache.latent.normal_()  # cached latents' values don't change the cost
        ids, times = torch.tensor([[5]]), []
        for i in range(steps + 2):
            pos = torch.tensor([[S + i]])
            t0 = time.perf_counter()
            eng.runner.logits(eng.runner.forward(ids, pos, 0, S=S + i + 1, plain=plain)).argmax(
                -1
            ).tolist()
            times.append(time.perf_counter() - t0)
        out.append(sorted(times[2:])[len(times[2:]) // 2] * 1e3)
        del eng
    model.config = cfg
    return out[0], out[1]


def bandwidth_gbs() -> float:
    x = torch.empty(64 << 20, dtype=torch.float32).fill_(1.0)  # 256 MB, far past the caches
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.nbytes / best / 1e9


def find_trained_checkpoint(root: str = "runs") -> Path | None:
    """The newest trained checkpoint under runs/ (config.json + model.safetensors +
    tokenizer.json, as `make run` writes), or None."""
    found = [
        p.parent
        for p in Path(root).glob("**/model.safetensors")
        if (p.parent / "config.json").exists() and (p.parent / "tokenizer.json").exists()
    ]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def prompt_maker(path: Path, vocab: int):
    """B -> prompts [B, 16]: text from the stdlib corpus when the checkpoint has a
    tokenizer, else the synthetic corpus."""
    if (path / "tokenizer.json").exists():
        from nanoseek.data.corpus import stdlib_files
        from nanoseek.data.tokenizer import Tokenizer

        tok = Tokenizer.load(path)
        ids = tok.encode(stdlib_files()[1][0].read_text())
        return lambda B: torch.tensor(
            [[tok.bos_id, *ids[100 * b : 100 * b + 15]] for b in range(B)]
        )
    gen = torch.Generator().manual_seed(1)
    return lambda B: synthetic_batch(vocab, B, 16, gen)[:, :16]


def decode_rows(model, path: Path, prompts, n: int, hf_cls, spec: bool = True) -> list[tuple]:
    """(what, batch, ttft s, tok/s, kv bytes/token, vs transformers) at batch 1 and 8."""
    hf = hf_cls.from_pretrained(path).eval()
    rows = []
    for B in (1, 8):
        x = prompts(B)
        ttft, tps, kvb = hf_run(hf, x, n)
        rows.append(("transformers generate", B, ttft, tps, kvb, 1.0))
        base = tps
        for name, kw in (
            ("nanoseek absorbed", {}),
            ("nanoseek plain (re-expand K/V)", {"plain": True}),
            ("nanoseek absorbed + MTP spec", {"speculative": True}),
        ):
            if kw.get("speculative") and not (spec and model.mtp):
                continue
            eng = Engine(model, max_batch=B, max_len=16 + n + 8, **kw)
            ttft, tps = ns_run(eng, x.tolist(), n)
            label = name + (f" (acc {eng.spec_stats.acceptance:.0%})" if eng.speculative else "")
            rows.append((label, B, ttft, tps, eng.cache.bytes_per_token(), tps / base))
    return rows


def print_rows(rows: list[tuple], what: str, n: int, threads: int) -> None:
    print(f"\nDecode, {what}, greedy, prompt 16, {n} new tokens, {threads} thread(s), fp32")
    table = [
        (name, B, f"{ttft * 1e3:.2f}", f"{tps:.0f}", kvb, f"{ratio:.2f}x")
        for name, B, ttft, tps, kvb, ratio in rows
    ]
    header = ("engine", "batch", "TTFT ms", "decode tok/s", "KV B/token", "vs HF")
    print(format_table(table, header=header))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--ckpt",
        default=None,
        help="a trained checkpoint (default: the newest under runs/); `tiny`: train the tiny preset",
    )
    ap.add_argument("--train-seconds", type=float, default=60.0)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads for every row (1: steadier)"
    )
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--no-small", action="store_true", help="skip the `small` preset rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tmp = tempfile.TemporaryDirectory()
    ckpt = None if args.ckpt == "tiny" else args.ckpt or find_trained_checkpoint()
    if ckpt:
        path = Path(ckpt)
    else:
        path = Path(tmp.name) / "tiny"
        nanoseek.save_pretrained(train_tiny(args.train_seconds), path)
    model = nanoseek.from_pretrained(path)
    cfg = model.config
    n = args.new_tokens
    prompts = prompt_maker(path, cfg.vocab_size)
    what = f"checkpoint {path}" if ckpt else "tiny config trained on the synthetic corpus"
    rows = decode_rows(model, path, prompts, n, DeepseekV3ForCausalLM)
    print_rows(rows, f"{cfg.num_hidden_layers}-layer {what}", n, args.threads)
    latent = nanoseek.config.kv_cache_bytes_per_token(cfg, 4)
    print(
        f"latent formula: {latent['latent']} B/token (fp32); full K/V would be {latent['full']} B/token"
    )
    if not args.no_small:  # a 6-layer, 256-wide model: overhead matters less than at tiny
        torch.manual_seed(0)
        small_path = Path(tmp.name) / "small"
        nanoseek.save_pretrained(nanoseek.Transformer(nanoseek.get_preset("small")), small_path)
        small = nanoseek.from_pretrained(small_path)
        small_rows = decode_rows(
            small, small_path, prompt_maker(small_path, 8192), n, DeepseekV3ForCausalLM, spec=False
        )
        print_rows(small_rows, "6-layer `small` preset (random weights)", n, args.threads)

    print("\nLong context, batch 1, ms per decode step (cache of random latents)")
    table = []
    for S in (2048, 8192):
        a, p = long_context(model, S)
        table.append((S, f"{a:.2f}", f"{p:.2f}", f"{p / a:.1f}x"))
    print(format_table(table, header=("context", "absorbed", "plain", "speedup")))

    bw = bandwidth_gbs()
    weights = param_counts(cfg)["activated"] * 4
    ctx = 16 + n // 2
    per_tok = weights + ctx * nanoseek.config.kv_cache_bytes_per_token(cfg, 4)["latent"]
    best = max(r[3] for r in rows if r[1] == 1 and r[0].startswith("nanoseek"))
    limit = bw * 1e9 / per_tok
    print(
        f"\nMemory bandwidth (256 MB sum): {bw:.1f} GB/s. Bytes read per decoded token at batch 1: "
        f"{per_tok / 1e6:.2f} MB (activated weights + cache) -> limit {limit:,.0f} tok/s; "
        f"nanoseek reaches {best:,.0f} tok/s = {best / limit:.1%} of it."
    )
    tmp.cleanup()


if __name__ == "__main__":
    main()
