"""GGUF export against llama.cpp itself: does llama.cpp tokenize and greedy-decode an
exported checkpoint exactly as nanoseek does?

    python -m benchmarks.gguf_llamacpp --ckpt runs/X [--ckpt runs/Y] \\
        [--llama-cpp /tmp/llama.cpp-build/src] [-n 32] [--dtypes f32,f16,q8_0]

`--llama-cpp` is a llama.cpp source tree built with CMake into build/ (libllama and
llama-simple), e.g. the one vendored in the llama-cpp-python sdist:

    cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release
    cmake --build build -j2 --target llama-simple llama-cli llama-batched-bench

For each checkpoint: export it (f32, and the other --dtypes), then compare with a 70-line C
program against libllama (compiled here; it prints token ids, which llama.cpp's tools do
not), with an f32 KV cache and no flash attention (exact) and with llama.cpp's defaults (f16
cache, flash attention, which rounds to f16 on CPU): the prompt's token ids
(llama.cpp's tokenizer, BOS added as the GGUF says, versus nanoseek's), the logits after the
prompt (max |difference|), and --n greedy tokens (plain argmax, not stopping at EOS) versus
`nanoseek generate --temperature 0`. Tokenization is also compared on every .py file of the
nanoseek package, and llama-simple's output (the command a user runs) on the first prompt.
Not part of `make test`: it needs the llama.cpp build.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import nanoseek
from nanoseek.config import ModelConfig
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.export import export_gguf, mtp_support
from nanoseek.hub import resolve_checkpoint
from nanoseek.infer import Engine, SamplingParams
from nanoseek.utils import format_table

PROMPTS = [
    "def forward(self, x",
    "import torch\n\n\nclass ",
    "    # the cache holds",
    '"""Héllo → ü, naïve café: 12345 + 678 = ?  \n\t',
]

GREEDY_C = r"""
#include "llama.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void quiet(enum ggml_log_level level, const char * text, void * data) {
    (void) level; (void) text; (void) data;
}

/* greedy MODEL N_PREDICT PROMPT_FILE: prints "prompt <ids>", then with N_PREDICT > 0
   "gen <ids>" (argmax each step, EOS included) and "logits <floats>" after the prompt. */
int main(int argc, char ** argv) {
    if (argc != 4) { fprintf(stderr, "usage: %s MODEL N_PREDICT PROMPT_FILE\n", argv[0]); return 1; }
    int n_predict = atoi(argv[2]);
    FILE * f = fopen(argv[3], "rb");
    if (!f) { fprintf(stderr, "cannot read %s\n", argv[3]); return 1; }
    fseek(f, 0, SEEK_END); long len = ftell(f); fseek(f, 0, SEEK_SET);
    char * text = malloc(len + 1);
    if (fread(text, 1, len, f) != (size_t) len) { return 1; }
    text[len] = 0; fclose(f);

    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    mp.load_mtp = getenv("LOAD_MTP") != NULL; /* the NextN layer too (a draft model's) */
    struct llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    const struct llama_vocab * vocab = llama_model_get_vocab(model);
    int n_vocab = llama_vocab_n_tokens(vocab);
    int n_prompt = -llama_tokenize(vocab, text, (int32_t) len, NULL, 0, true, false);
    llama_token * toks = malloc(sizeof(llama_token) * (n_prompt + n_predict + 1));
    llama_tokenize(vocab, text, (int32_t) len, toks, n_prompt, true, false);
    printf("prompt");
    for (int i = 0; i < n_prompt; i++) printf(" %d", toks[i]);
    printf("\n");
    if (n_predict <= 0) return 0;

    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_prompt + n_predict;
    cp.n_batch = n_prompt;
    cp.n_ubatch = n_prompt;
    cp.n_threads = 1;
    cp.n_threads_batch = 1;
    if (getenv("EXACT")) { /* by default llama.cpp caches K/V (MLA: the latent) in f16, and
                              its CPU flash attention rounds the query to f16 */
        cp.type_k = GGML_TYPE_F32;
        cp.type_v = GGML_TYPE_F32;
        cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    }
    struct llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "cannot create a context\n"); return 1; }
    float * first = malloc(sizeof(float) * n_vocab);
    struct llama_batch batch = llama_batch_get_one(toks, n_prompt);
    int n = n_prompt;
    printf("gen");
    for (int step = 0; step < n_predict; step++) {
        if (llama_decode(ctx, batch)) { fprintf(stderr, "decode failed\n"); return 1; }
        const float * logits = llama_get_logits_ith(ctx, -1);
        if (step == 0) memcpy(first, logits, sizeof(float) * n_vocab);
        int best = 0;
        for (int v = 1; v < n_vocab; v++) if (logits[v] > logits[best]) best = v;
        toks[n++] = best;
        printf(" %d", best);
        batch = llama_batch_get_one(&toks[n - 1], 1);
    }
    printf("\nlogits");
    for (int v = 0; v < n_vocab; v++) printf(" %.9g", first[v]);
    printf("\n");
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
"""


def build_greedy(llama: Path, out: Path) -> Path:
    exe = out / "greedy"
    lib = llama / "build" / "bin"
    inc = [f"-I{llama / 'include'}", f"-I{llama / 'ggml' / 'include'}"]
    (out / "greedy.c").write_text(GREEDY_C)
    cmd = ["cc", "-O2", "-o", exe, out / "greedy.c", *inc, f"-L{lib}", f"-Wl,-rpath,{lib}"]
    subprocess.run([*map(str, cmd), "-lllama", "-lggml", "-lggml-base"], check=True)
    return exe


def llama_run(
    exe: Path, gguf: Path, text: str, n: int, tmp: Path, exact: bool = False
) -> dict[str, list]:
    prompt = tmp / "prompt.txt"
    prompt.write_bytes(text.encode())
    env = {**os.environ, **({"EXACT": "1"} if exact else {})}
    cmd = [str(exe), str(gguf), str(n), str(prompt)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    rows = dict(line.split(" ", 1) if " " in line else (line, "") for line in out.splitlines())
    return {
        "prompt": [int(x) for x in rows["prompt"].split()],
        "gen": [int(x) for x in rows.get("gen", "").split()],
        "logits": [float(x) for x in rows.get("logits", "").split()],
    }


def check(ckpt: Path, llama: Path, exe: Path, n: int, dtypes: list[str], tmp: Path) -> list:
    tok = Tokenizer.load(ckpt)
    model = nanoseek.from_pretrained(ckpt).eval()
    engine = Engine(model, tok, max_len=256)
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    rows, files = [], {}
    for dtype in dtypes:
        t0 = time.perf_counter()
        files[dtype] = export_gguf(ckpt, tmp / f"{ckpt.parent.name}-{dtype}.gguf", dtype)
        print(f"exported {dtype} in {time.perf_counter() - t0:.1f}s", flush=True)
    # the tokenizer, on real text: every .py file of the package
    texts = [p.read_text() for p in sorted(Path(nanoseek.__file__).parent.rglob("*.py"))]
    same = sum(
        llama_run(exe, files["f32"], t, 0, tmp)["prompt"] == [tok.bos_id, *tok.encode(t)]
        for t in texts
    )
    print(f"tokenization: {same}/{len(texts)} files give nanoseek's ids (BOS first)", flush=True)
    if mtp_support(model.config)[0]:  # the NextN layer loads (with load_mtp, as a draft head)
        (tmp / "p.txt").write_text(PROMPTS[0])
        cmd = [str(exe), str(files["f32"]), "0", str(tmp / "p.txt")]
        mtp = subprocess.run(cmd, capture_output=True, env={**os.environ, "LOAD_MTP": "1"})
        print(f"MTP as llama.cpp's NextN layer: loads = {mtp.returncode == 0}", flush=True)
    for prompt in PROMPTS:
        ours_prompt = engine.encode(prompt)
        ours = engine.generate([prompt], params)[0].token_ids
        with torch.no_grad():
            logits = model(torch.tensor([ours_prompt])).logits[0, -1]
        # f32 weights, f32 KV cache, no flash attention: the exactness check; then each file
        # with llama.cpp's defaults (what a user gets)
        runs = [("f32", True)] + [(dtype, False) for dtype in dtypes]
        for dtype, exact in runs:
            got = llama_run(exe, files[dtype], prompt, n, tmp, exact)
            agree = next(
                (i for i, (a, b) in enumerate(zip(ours, got["gen"], strict=False)) if a != b), n
            )
            diff = (torch.tensor(got["logits"]) - logits).abs().max().item()
            rows.append(
                (
                    f"{prompt[:24]!r}",
                    dtype,
                    "f32 cache, no FA" if exact else "defaults",
                    "yes" if got["prompt"] == ours_prompt else "NO",
                    f"{agree}/{n}" + (" (identical)" if got["gen"] == list(ours) else ""),
                    f"{diff:.2e}",
                )
            )
    # what a user runs: llama-simple's text (prompt pieces with <|bos|>, then the completion,
    # which stops at EOS / <|end|>, as `nanoseek generate` does)
    simple = llama / "build" / "bin" / "llama-simple"
    if simple.exists():
        cmd = [str(simple), "-m", str(files["f32"]), "-n", str(n), PROMPTS[0]]
        text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        gen = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=n, temperature=0.0))[0]
        want = tok.decode([tok.bos_id]) + PROMPTS[0] + gen.text
        print(f"llama-simple: {shlex.join(cmd)}", flush=True)
        print(f"  text identical to nanoseek's: {text.rstrip(chr(10)) == want}; {text!r}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", action="append", required=True, help="checkpoint or run dir")
    ap.add_argument("--llama-cpp", default="/tmp/llama.cpp-build/src", type=Path)
    ap.add_argument("-n", type=int, default=32, help="greedy tokens per prompt")
    ap.add_argument("--dtypes", default="f32,f16,q8_0")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dtypes = args.dtypes.split(",")
    if dtypes[0] != "f32":
        dtypes.insert(0, "f32")
    with tempfile.TemporaryDirectory() as tmp:
        exe = build_greedy(args.llama_cpp, Path(tmp))
        for ckpt in args.ckpt:
            ckpt = resolve_checkpoint(ckpt)
            cfg = ModelConfig.load(ckpt)
            print(f"\n== {ckpt} (q_lora_rank {cfg.q_lora_rank}, {cfg.num_hidden_layers} layers)")
            rows = check(ckpt, args.llama_cpp, exe, args.n, dtypes, Path(tmp))
            header = (
                "prompt",
                "gguf",
                "llama.cpp",
                "prompt ids equal",
                "greedy tokens agree",
                "max |dlogit|",
            )
            print(format_table(rows, header=header))


if __name__ == "__main__":
    main()
