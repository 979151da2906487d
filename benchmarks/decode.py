"""Decode benchmark: nanoseek's engine versus transformers `generate(use_cache=True)`.

    python -m benchmarks.decode [--ckpt PATH] [--train-seconds 60] [--threads 1] [--no-small]
        [--llama-cpp DIR (default $NANOSEEK_LLAMA_CPP)] [--llama-cpp-threads 1,2]
        [--rounds 3] [--llama-cpp-only]

One run, same weights for both (saved with nanoseek, loaded by both): decode tokens/s and
time to first token at batch 1 and 8, KV-cache bytes per token read off the tensors each
holds, absorbed vs plain attention at 2K and 8K tokens of context, MTP speculation on a
trained model (adaptive: the row says how many steps drafted; with and without the lookup
draft after the MTP one), the compiled engine
(`compile=True`; its compilation happens in the warm-up, untimed), and the bytes a token
reads with the rates they are read at.

Without --ckpt the newest trained checkpoint under runs/ is used (prompts from the stdlib
corpus); failing that, the tiny preset is trained for --train-seconds on a synthetic
second-order corpus (so MTP drafts have something to learn, but not everything). Tiny
numbers say what the engine does where per-op overhead, not arithmetic or bandwidth, sets
the speed; the `small` preset rows (6 layers, hidden 256, random weights) show a size
where reading the weights starts to matter.

With --llama-cpp (a llama.cpp tree built into build/, as benchmarks/gguf_llamacpp.py
describes) the checkpoint is also exported to GGUF f32, f16 and q8_0 and decoded by
llama.cpp through libllama (gguf_llamacpp.BENCH_C) next to nanoseek's engine: same prompt
ids, same number of greedy tokens, same thread counts (1 and 2), batch 1 and 8 and 16
concurrent sequences, f32 KV cache and no flash attention on both sides, the engines
alternating within each of --rounds rounds (best and spread printed). Each row gives the
ratio nanoseek / llama.cpp and whether its greedy tokens equal fp32 nanoseek's. Where
nanoseek's decode kernels build (x86 with AVX2, a C++ compiler), the fp32 engines run their
small matmuls in them (the default), a "MKL matmuls" row runs the compiled engine without
them, and the int8 engines (weight-only, `quantize="int8"`) run too, with their own ratio
column. Without them those rows are skipped with a line saying why.

No "memory-bandwidth limit" is printed: the bytes a token reads and the rates of DRAM and
of the last-level cache are, but once the cache holds the part of the weights every token
reads (attention, dense layer, shared experts, head: 14 MB of `small`'s 30 MB per token,
in a 32 MB L3), DRAM bandwidth bounds only the routed experts' share, so the old
"bytes / DRAM bandwidth" figure was no limit (llama.cpp f32 decoded above it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
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


def ns_run(engine: Engine, prompts: list[list[int]], n: int, tokens: list | None = None):
    """(time to first token, decode tokens/s after it); the greedy ids of each prompt are
    appended to `tokens` when given."""
    sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    # warm-up: the same run, so that a compiled engine has compiled every step shape the
    # timed run takes (plain, verify, and each batch size) before the clock starts
    engine.generate(prompts, sp)
    seqs = [engine.add_request(p, sp).id for p in prompts]
    out = {s: [] for s in seqs}
    t0 = time.perf_counter()
    for o in engine.step():  # the prefill: every prompt's first token
        out[o.seq_id] += o.token_ids
    ttft = time.perf_counter() - t0
    t1 = time.perf_counter()
    produced = 0
    while engine.has_unfinished():
        for o in engine.step():
            out[o.seq_id] += o.token_ids
            produced += len(o.token_ids)
    tps = produced / (time.perf_counter() - t1)
    if tokens is not None:
        tokens.extend(out[s] for s in seqs)
    return ttft, tps


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


def read_gbs(nbytes: int) -> float:
    """GB/s of summing an fp32 buffer of `nbytes` (best of 5, after a warm-up pass), at the
    current torch thread count: 256 MB is DRAM; a few MB stays in the last-level cache."""
    x = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    best = float("inf")
    for _ in range(6):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.nbytes / best / 1e9


def llc_bytes() -> int | None:
    """The last-level cache's size from sysfs (Linux), or None."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        v = f.read_text().strip()
        sizes.append(int(v[:-1]) * {"K": 1 << 10, "M": 1 << 20}[v[-1]] if v[-1] in "KM" else int(v))
    return max(sizes) if sizes else None


LLAMA_ROWS = (("f32", "llama.cpp f32 GGUF"), ("f16", "llama.cpp f16"), ("q8_0", "llama.cpp q8_0"))


def llama_cpp_compare(
    model, ckpt: Path, prompts, n: int, llama: Path, threads=(1, 2), batches=(1, 8, 16), rounds=3
) -> dict:
    """nanoseek's engine against llama.cpp (through libllama, `gguf_llamacpp.BENCH_C`) on
    the same weights exported as GGUF f32/f16/q8_0: same prompts (token ids), same greedy
    tokens count, same thread count, f32 KV cache and no flash attention on both sides.
    The engines alternate within each round; best of `rounds`, spread kept. Returns
    {"speeds": {(threads, batch): {engine: [tok/s per round]}}, "agree": {(engine,
    threads, batch): (tokens equal to nanoseek absorbed's, tokens)}}, for `print_llama_cpp`."""
    from benchmarks.gguf_llamacpp import build_bench, llama_bench
    from nanoseek.export import export_gguf

    tmp = Path(tempfile.mkdtemp())
    exe = build_bench(llama, tmp)
    files = {d: export_gguf(ckpt, tmp / f"model-{d}.gguf", d, verbose=False) for d, _ in LLAMA_ROWS}
    engines = [("nanoseek absorbed", {}), ("nanoseek compiled", {"compile": True})]
    kernels = kernels_available()
    if kernels:  # the same engine with MKL's matmuls instead of nanoseek's fp32 kernel
        engines.append(("nanoseek compiled, MKL matmuls", {"compile": True, "kernels": False}))
    if model.mtp:
        engines.append(("nanoseek absorbed + MTP spec", {"speculative": True}))
        engines.append(("nanoseek compiled + MTP spec", {"speculative": True, "compile": True}))
        mtp_only = {"speculative": True, "compile": True, "lookup_drafts": 0}
        engines.append(("nanoseek compiled + MTP spec, no lookup", mtp_only))
    engines.append(("nanoseek compiled + 4 lookup drafts", {"compile": True, "lookup_drafts": 4}))
    if kernels:
        engines.append(("nanoseek compiled int8", {"compile": True, "quantize": "int8"}))
        if model.mtp:
            mtp8 = {"speculative": True, "compile": True, "quantize": "int8"}
            engines.append(("nanoseek compiled + MTP spec int8", mtp8))
    speeds: dict = {}
    agree: dict = {}  # (engine, threads, batch) -> (tokens equal, tokens)
    built: dict = {}  # engines kept across rounds: a compiled one compiles once
    failed: dict = {}  # llama.cpp row -> why llama.cpp failed on it (the row is left out)
    for _ in range(rounds):
        for T in threads:
            torch.set_num_threads(T)
            for B in batches:
                x = prompts(B).tolist()
                cell = speeds.setdefault((T, B), {})
                ref: list = []
                for name, kw in engines:
                    key = (name, T, B)
                    if key not in built:
                        built[key] = Engine(model, max_batch=B, max_len=16 + n + 8, **kw)
                    got: list = []
                    cell.setdefault(name, []).append(ns_run(built[key], x, n, got)[1])
                    ref = ref or got
                    if got is not ref:
                        _tally(agree, (name, T, B), ref, got)
                for d, name in LLAMA_ROWS:
                    if name in failed:
                        continue
                    try:
                        _, tps, got = llama_bench(exe, files[d], x, n, T, tmp)
                    except subprocess.CalledProcessError as e:  # llama.cpp's own failure
                        lines = (e.stderr or "").strip().splitlines() or [f"exit {e.returncode}"]
                        failed[name] = next((s for s in lines if "GGML_ASSERT" in s), lines[0])
                        continue
                    cell.setdefault(name, []).append(tps)
                    _tally(agree, (name, T, B), ref, got)
    shutil.rmtree(tmp)
    return {"speeds": speeds, "agree": agree, "failed": failed}


def kernels_available() -> bool:
    from nanoseek.kernels import unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        print(f"(rows of nanoseek's own kernels skipped, fp32 rows run MKL: {reason})")
    return reason is None


def _tally(agree: dict, key, ref: list[list[int]], got: list[list[int]]) -> None:
    same = sum(a == b for r, g in zip(ref, got, strict=True) for a, b in zip(r, g, strict=True))
    total = sum(len(r) for r in ref)
    s, t = agree.get(key, (0, 0))
    agree[key] = (s + same, t + total)


def print_llama_cpp(res: dict, n: int, rounds: int) -> None:
    speeds, agree = res["speeds"], res["agree"]
    print(
        f"\nnanoseek vs llama.cpp (libllama), same weights, greedy, prompt 16, {n} new tokens, "
        "f32 KV cache and no flash attention on both; decode tok/s (aggregate over the batch), "
        f"best of {rounds} rounds (min-max), engines alternating within each round"
    )
    table = []
    for (T, B), cell in sorted(speeds.items()):
        ours = {k: max(v) for k, v in cell.items() if k.startswith("nanoseek")}
        base = ours["nanoseek absorbed"]
        top = max(v for k, v in ours.items() if not k.endswith("int8"))
        top8 = max((v for k, v in ours.items() if k.endswith("int8")), default=None)
        for name, v in cell.items():
            same, tot = agree.get((name, T, B), (0, 0))
            ident = (
                "(reference)"
                if name == "nanoseek absorbed"
                else ("identical" if same == tot else f"{same}/{tot} tokens")
            )
            llama = not name.startswith("nanoseek")
            table.append(
                (
                    T,
                    B,
                    name,
                    f"{max(v):,.0f}",
                    f"{min(v):,.0f}-{max(v):,.0f}",
                    f"{base / max(v):.2f}x" if llama else "",
                    f"{top / max(v):.2f}x" if llama else "",
                    f"{top8 / max(v):.2f}x" if llama and top8 else "",
                    ident,
                )
            )
    header = (
        "threads",
        "batch",
        "engine",
        "tok/s",
        "spread",
        "nanoseek absorbed / it",
        "nanoseek best fp32 / it",
        "nanoseek best int8 / it",
        "greedy vs nanoseek",
    )
    print(format_table(table, header=header))
    for name, why in res.get("failed", {}).items():
        print(f"{name}: left out, llama.cpp failed on it here: {why}")
    f32 = [v for (name, *_), v in agree.items() if name == "llama.cpp f32 GGUF"]
    ok = all(s == t for s, t in f32)
    print(
        "greedy tokens, llama.cpp f32 GGUF vs nanoseek (same batch, same threads): "
        + ("identical token for token in every run" if ok else "DIFFER (see the table)")
    )


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
            ("nanoseek compiled", {"compile": True}),
            ("nanoseek compiled, MKL matmuls", {"compile": True, "kernels": False}),
            ("nanoseek compiled + MTP spec", {"speculative": True, "compile": True}),
            (
                "nanoseek compiled + MTP spec, no lookup",
                {"speculative": True, "compile": True, "lookup_drafts": 0},
            ),
            ("nanoseek compiled + 4 lookup drafts", {"compile": True, "lookup_drafts": 4}),
        ):
            if kw.get("speculative") and not (spec and model.mtp):
                continue
            eng = Engine(model, max_batch=B, max_len=16 + n + 8, **kw)
            ttft, tps = ns_run(eng, x.tolist(), n)
            st = eng.spec_stats
            label = name + (
                f" (acc {st.acceptance:.0%}, {st.steps}/{st.steps + st.plain_steps} steps drafted)"
                if eng.drafting
                else ""
            )
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
    ap.add_argument(
        "--llama-cpp",
        type=Path,
        default=os.environ.get("NANOSEEK_LLAMA_CPP") or None,
        help="a llama.cpp source tree built into build/ (libllama), to compare against on the "
        "checkpoint's weights (default: $NANOSEEK_LLAMA_CPP)",
    )
    ap.add_argument(
        "--llama-cpp-threads", default="1,2", help="thread counts of the llama.cpp comparison"
    )
    ap.add_argument("--rounds", type=int, default=3, help="llama.cpp comparison: best of N")
    ap.add_argument(
        "--llama-cpp-only",
        action="store_true",
        help="only the llama.cpp comparison (and the bandwidth line): no transformers rows",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
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
    rows: list[tuple] = []
    if not args.llama_cpp_only:
        from transformers import DeepseekV3ForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        rows = decode_rows(model, path, prompts, n, DeepseekV3ForCausalLM)
        print_rows(rows, f"{cfg.num_hidden_layers}-layer {what}", n, args.threads)
        latent = nanoseek.config.kv_cache_bytes_per_token(cfg, 4)
        print(
            f"latent formula: {latent['latent']} B/token (fp32); "
            f"full K/V would be {latent['full']} B/token"
        )
    if not (args.no_small or args.llama_cpp_only):  # 6 layers, 256 wide: less overhead-bound
        torch.manual_seed(0)
        small_path = Path(tmp.name) / "small"
        nanoseek.save_pretrained(nanoseek.Transformer(nanoseek.get_preset("small")), small_path)
        small = nanoseek.from_pretrained(small_path)
        small_rows = decode_rows(
            small, small_path, prompt_maker(small_path, 8192), n, DeepseekV3ForCausalLM, spec=False
        )
        print_rows(small_rows, "6-layer `small` preset (random weights)", n, args.threads)

    if not args.llama_cpp_only:
        print("\nLong context, batch 1, ms per decode step (cache of random latents)")
        table = []
        for S in (2048, 8192):
            a, p = long_context(model, S)
            table.append((S, f"{a:.2f}", f"{p:.2f}", f"{p / a:.1f}x"))
        print(format_table(table, header=("context", "absorbed", "plain", "speedup")))

    best = {
        "nanoseek": max(
            (r[3] for r in rows if r[1] == 1 and r[0].startswith("nanoseek")), default=0
        )
    }
    best_threads = args.threads
    if args.llama_cpp is None:
        print(
            "\nllama.cpp rows skipped: give a llama.cpp tree built into build/ with --llama-cpp "
            "DIR or NANOSEEK_LLAMA_CPP=DIR (see benchmarks/gguf_llamacpp.py for the build)"
        )
    elif not (path / "tokenizer.json").exists():
        print(f"\nllama.cpp rows skipped: {path} has no tokenizer.json, which the GGUF needs")
    else:
        threads = tuple(int(t) for t in args.llama_cpp_threads.split(","))
        res = llama_cpp_compare(
            model, path, prompts, n, args.llama_cpp, threads, rounds=args.rounds
        )
        torch.set_num_threads(args.threads)
        print_llama_cpp(res, n, args.rounds)
        best_threads = threads[0]
        cell = res["speeds"][(best_threads, 1)]
        best = {
            "nanoseek fp32": max(
                max(v) for k, v in cell.items() if k.startswith("nanoseek") and "int8" not in k
            ),
            "llama.cpp f32": max(cell["llama.cpp f32 GGUF"]),
        }

    # Bytes per decoded token and the rates they are read at. No "bandwidth limit" is
    # derived from them: a DRAM figure bounds nothing when the last-level cache keeps the
    # part every token reads (attention, dense layer, shared experts, head) across tokens
    # (llama.cpp f32 decoded above such a "limit"), and a cache figure bounds nothing
    # either, since the routed experts come from a pool larger than the cache.
    torch.set_num_threads(best_threads)
    dram = read_gbs(256 << 20)
    llc = llc_bytes()
    cached = read_gbs(min(llc // 2, 64 << 20)) if llc else None
    torch.set_num_threads(args.threads)
    weights = param_counts(cfg)["activated"] * 4
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4
    routed = moe_layers * cfg.num_experts_per_tok * expert
    pool = moe_layers * cfg.n_routed_experts * expert
    ctx = 16 + n // 2
    per_tok = weights + ctx * nanoseek.config.kv_cache_bytes_per_token(cfg, 4)["latent"]
    print(
        f"\nBytes read per decoded token at batch 1: {per_tok / 1e6:.1f} MB (activated fp32 "
        f"weights + cache): {(per_tok - routed) / 1e6:.1f} MB read by every token, "
        f"{routed / 1e6:.1f} MB of routed experts out of a {pool / 1e6:.1f} MB pool. "
        f"Read rates at {best_threads} thread(s): DRAM (256 MB sum) {dram:.1f} GB/s"
        + (
            f", last-level cache ({llc >> 20} MB; sum of {min(llc // 2, 64 << 20) >> 20} MB) "
            f"{cached:.1f} GB/s"
            if llc
            else ""
        )
        + ". Effective: "
        + ", ".join(f"{k} {v:,.0f} tok/s = {v * per_tok / 1e9:.1f} GB/s" for k, v in best.items())
        + ". No limit is printed: with the every-token part in cache, DRAM bandwidth bounds "
        "only the routed experts' share, and how much of those the cache keeps depends on routing."
    )
    tmp.cleanup()


if __name__ == "__main__":
    main()
