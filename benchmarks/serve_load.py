"""Serving under load: `nanoseek serve` with 1, 4 and 16 concurrent streaming chat clients.

    python -m benchmarks.serve_load [--max-tokens 128] [--system-words 120] [--threads 1]
                                    [--prefix-cache | --no-prefix-cache]

The server runs as its own process (`nanoseek serve`, loopback, one engine thread) over the
`small` preset with random weights and a tokenizer trained on part of the stdlib corpus;
clients are asyncio tasks with the `openai` client in this process, each sending its share
of a fixed number of requests one after another. Every reply is exactly --max-tokens long
(`ignore_eos`): this measures speed, not text.

Two prompt kinds, of the same length: every request with its own system prompt ("unique":
nothing in common from the first token) or all requests with the same one ("shared": what
a prefix cache can reuse). Without a prefix cache both should cost the same; with one
(`--prefix-cache`, passed to the engine when it supports it) "shared" should start sooner.

Per row: aggregate tokens/s (all reply tokens over the row's wall time) and its ratio to the
1-client row; time to first token (request sent -> first text) and per-token latency
((last text - first text) / (tokens - 1)) at p50 and p99 over the row's requests (with 32
requests, p99 is the slowest). Below the table, the engine alone (no HTTP, same model, same
threads): decode tokens/s at batch 1 and 16, the ceiling for the 16-client ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

import nanoseek
from nanoseek.data.corpus import stdlib_files
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.utils import format_table

CLIENTS = (1, 4, 16)
REQUESTS = {1: 4, 4: 8, 16: 32}  # bounded: the whole run takes about a minute on 2 cores
SYSTEM = (
    "You are a careful assistant for Python programmers. Answer with short, correct code and "
    "say why it works. Prefer the standard library, name the module you use, and point out "
    "edge cases such as empty inputs, unicode, large files and concurrency. "
)


def build_checkpoint(out: Path) -> None:
    """`small` with random weights + a tokenizer trained on ~1.5 MB of stdlib sources."""
    texts = [f.read_text(errors="replace") for f in stdlib_files()[1][:120]]
    tok = Tokenizer.train(texts, vocab_size=8192)
    torch.manual_seed(0)
    # the preset's 8192, unless this corpus slice yields fewer merges: every id must decode
    cfg = nanoseek.get_preset("small").replace(vocab_size=tok.vocab_size)
    nanoseek.save_pretrained(nanoseek.Transformer(cfg), out)
    tok.save(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, port: int, args) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "nanoseek",
        "serve",
        str(ckpt),
        "--port",
        str(port),
        "--max-batch",
        str(max(CLIENTS)),
        "--max-len",
        "512",
        "--threads",
        str(args.threads),
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--model-name",
        "small",
    ]
    if args.prefix_cache is not None:
        cmd.append("--prefix-cache" if args.prefix_cache else "--no-prefix-cache")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited:\n{proc.stdout.read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError("the server did not come up in 120 s")
        time.sleep(0.2)


def messages(kind: str, i: int, system_words: int) -> list[dict]:
    words = (SYSTEM * 50).split()[:system_words]
    if kind == "unique":  # differs from the first token on: no shared prefix at all
        words = [f"[session {i:04d}]", *words[1:]]
    return [
        {"role": "system", "content": " ".join(words)},
        {"role": "user", "content": f"Question {i}: how do I read a file line by line?"},
    ]


async def one_request(client, msgs: list[dict], max_tokens: int) -> tuple[float, float, int]:
    """(time to first text, per-token latency, tokens) of one streamed chat completion."""
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    stream = await client.chat.completions.create(
        model="small",
        messages=msgs,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.role is None:  # past the role chunk
            now = time.perf_counter()
            first = first or now
            last = now
    return first - t0, (last - first) / max(tokens - 1, 1), tokens


def engine_ceiling(ckpt: Path, prompt_len: int, max_tokens: int) -> dict[int, float]:
    """Decode tokens/s of the engine itself at batch 1 and 16 (prefill excluded)."""
    from nanoseek.infer import Engine, SamplingParams

    engine = Engine.load(ckpt, max_batch=max(CLIENTS), max_len=512)
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    out = {}
    for B in (1, max(CLIENTS)):
        gen = torch.Generator().manual_seed(B)
        for _ in range(B):
            engine.add_request(torch.randint(10, 8000, (prompt_len,), generator=gen).tolist(), sp)
        engine.step()  # the prefill
        t0, n = time.perf_counter(), 0
        while engine.has_unfinished():
            n += sum(len(o.token_ids) for o in engine.step())
        out[B] = n / (time.perf_counter() - t0)
    return out


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


async def run_row(url: str, kind: str, clients: int, args, offset: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)
    n = REQUESTS[clients]
    results: list[tuple[float, float, int]] = []

    async def worker(c: int) -> None:
        for k in range(c, n, clients):
            msgs = messages(kind, offset + k, args.system_words)
            results.append(await one_request(client, msgs, args.max_tokens))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()
    ttft, tpot, toks = zip(*results, strict=True)
    return {
        "tokens": sum(toks),
        "tps": sum(toks) / wall,
        "ttft": (pct(ttft, 0.5), pct(ttft, 0.99)),
        "tpot": (pct(tpot, 0.5), pct(tpot, 0.99)),
        "requests": n,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens per reply (fixed)")
    ap.add_argument("--system-words", type=int, default=120, help="system prompt length, in words")
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    ap.add_argument(
        "--prefix-cache",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pass --prefix-cache/--no-prefix-cache to the server (default: its default)",
    )
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "small"
        t0 = time.perf_counter()
        build_checkpoint(ckpt)
        print(f"checkpoint (small, random weights) built in {time.perf_counter() - t0:.0f} s")
        torch.set_num_threads(args.threads)
        tok = Tokenizer.load(ckpt)
        prompt_len = len(tok.apply_chat_template(messages("shared", 0, args.system_words)))
        ceiling = engine_ceiling(ckpt, prompt_len, args.max_tokens)
        port = free_port()
        proc = start_server(ckpt, port, args)
        url = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(run_row(url, "unique", 1, args, offset=10_000))  # warm-up
            rows, offset = [], 0
            for kind in ("unique", "shared"):
                base = None
                for clients in CLIENTS:
                    r = asyncio.run(run_row(url, kind, clients, args, offset))
                    offset += r["requests"]
                    base = base or r["tps"]
                    rows.append(
                        (
                            kind,
                            clients,
                            r["requests"],
                            f"{r['tps']:.0f}",
                            f"{r['tps'] / base:.2f}x",
                            f"{r['ttft'][0] * 1e3:.0f}",
                            f"{r['ttft'][1] * 1e3:.0f}",
                            f"{r['tpot'][0] * 1e3:.1f}",
                            f"{r['tpot'][1] * 1e3:.1f}",
                        )
                    )
                    print(f"  {kind} x{clients}: {r['tps']:.0f} tok/s", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    title = (
        f"Serving `small` (random weights), streaming chat, {args.max_tokens} tokens per reply, "
        f"prompt {prompt_len} tokens, server: 1 engine thread x {args.threads} torch "
        f"thread(s), max batch {max(CLIENTS)}, prefix cache: "
        f"{'server default' if args.prefix_cache is None else args.prefix_cache}"
    )
    header = (
        "system prompt",
        "clients",
        "requests",
        "tok/s",
        "vs 1",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "per-token p50 ms",
        "per-token p99 ms",
    )
    print()
    print(format_table(rows, title, header))
    b1, b16 = ceiling[1], ceiling[max(CLIENTS)]
    print(
        f"Engine alone (no HTTP, same model and threads), decode only: {b1:.0f} tok/s at batch 1, "
        f"{b16:.0f} at batch {max(CLIENTS)} ({b16 / b1:.2f}x): the ceiling for the 16-client ratio."
    )


if __name__ == "__main__":
    main()
