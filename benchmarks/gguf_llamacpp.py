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

BENCH_C / `build_bench` / `llama_bench`: the same greedy decode, timed and batched (one
sequence per prompt), which `benchmarks.decode --llama-cpp` runs against nanoseek's engine.
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


BENCH_C = r"""
#include "llama.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void quiet(enum ggml_log_level level, const char * text, void * data) {
    (void) level; (void) text; (void) data;
}

static double now(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec;
}

static int argmax(const float * l, int n) {
    int best = 0;
    for (int v = 1; v < n; v++) if (l[v] > l[best]) best = v;
    return best;
}

/* every prompt is its own sequence: one prefill of all of them, then n_predict - 1 decode
   steps of one token per sequence (argmax, EOS not stopping); out[s * n_predict + i] */
static int run(struct llama_context * ctx, int n_seq, const int * plen, llama_token ** prompts,
               int n_predict, int n_vocab, llama_token * out, double * t_pre, double * t_dec) {
    llama_memory_clear(llama_get_memory(ctx), true);
    int total = 0;
    for (int s = 0; s < n_seq; s++) total += plen[s];
    struct llama_batch b = llama_batch_init(total > n_seq ? total : n_seq, 0, 1);
    int * last = malloc(sizeof(int) * n_seq), k = 0;
    for (int s = 0; s < n_seq; s++) {
        for (int i = 0; i < plen[s]; i++, k++) {
            b.token[k] = prompts[s][i]; b.pos[k] = i; b.n_seq_id[k] = 1; b.seq_id[k][0] = s;
            b.logits[k] = i == plen[s] - 1;
        }
        last[s] = k - 1;
    }
    b.n_tokens = k;
    double t0 = now();
    if (llama_decode(ctx, b)) return 1;
    for (int s = 0; s < n_seq; s++)
        out[s * n_predict] = argmax(llama_get_logits_ith(ctx, last[s]), n_vocab);
    double t1 = now();
    for (int step = 1; step < n_predict; step++) {
        b.n_tokens = n_seq;
        for (int s = 0; s < n_seq; s++) {
            b.token[s] = out[s * n_predict + step - 1]; b.pos[s] = plen[s] + step - 1;
            b.n_seq_id[s] = 1; b.seq_id[s][0] = s; b.logits[s] = 1;
        }
        if (llama_decode(ctx, b)) return 1;
        for (int s = 0; s < n_seq; s++)
            out[s * n_predict + step] = argmax(llama_get_logits_ith(ctx, s), n_vocab);
    }
    *t_pre = t1 - t0; *t_dec = now() - t1;
    llama_batch_free(b); free(last);
    return 0;
}

/* bench MODEL N_PREDICT THREADS IDS_FILE: IDS_FILE holds one prompt of token ids per line,
   decoded together (one sequence each, unified KV cache off) after a 4-token warm-up run.
   Prints "time <prefill s> <decode s>" and one "gen <ids>" per sequence. f32 KV cache and no
   flash attention (exact, as the greedy check) unless DEFAULTS is set. */
int main(int argc, char ** argv) {
    if (argc != 5) { fprintf(stderr, "usage: %s MODEL N_PREDICT THREADS IDS_FILE\n", argv[0]); return 1; }
    int n_predict = atoi(argv[2]), threads = atoi(argv[3]);
    FILE * f = fopen(argv[4], "r");
    if (!f) { fprintf(stderr, "cannot read %s\n", argv[4]); return 1; }
    int n_seq = 0, plen[256], max_plen = 0;
    llama_token * prompts[256];
    char line[65536];
    while (n_seq < 256 && fgets(line, sizeof line, f)) {
        prompts[n_seq] = malloc(sizeof(llama_token) * 8192);
        int n = 0; char * p = line, * end;
        for (long v = strtol(p, &end, 10); end != p; v = strtol(p, &end, 10)) {
            prompts[n_seq][n++] = (llama_token) v; p = end;
        }
        if (n == 0) continue;
        plen[n_seq++] = n;
        if (n > max_plen) max_plen = n;
    }
    fclose(f);

    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    struct llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    struct llama_context_params cp = llama_context_default_params();
    cp.n_seq_max = n_seq;
    cp.kv_unified = false;
    cp.n_ctx = n_seq * (max_plen + n_predict);
    cp.n_batch = cp.n_ubatch = n_seq * max_plen;
    cp.n_threads = cp.n_threads_batch = threads;
    if (!getenv("DEFAULTS")) {
        cp.type_k = GGML_TYPE_F32;
        cp.type_v = GGML_TYPE_F32;
        cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    }
    struct llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "cannot create a context\n"); return 1; }
    llama_token * out = malloc(sizeof(llama_token) * n_seq * n_predict);
    double t_pre, t_dec;
    int warm = n_predict < 4 ? n_predict : 4;
    if (run(ctx, n_seq, plen, prompts, warm, n_vocab, out, &t_pre, &t_dec)) return 1;
    if (run(ctx, n_seq, plen, prompts, n_predict, n_vocab, out, &t_pre, &t_dec)) return 1;
    printf("time %.9f %.9f\n", t_pre, t_dec);
    for (int s = 0; s < n_seq; s++) {
        printf("gen");
        for (int i = 0; i < n_predict; i++) printf(" %d", out[s * n_predict + i]);
        printf("\n");
    }
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
"""


def build_c(llama: Path, out: Path, name: str = "greedy", source: str = GREEDY_C) -> Path:
    """Compile `source` against the libllama of the llama.cpp tree `llama` (built into
    build/bin) as out/name."""
    exe = out / name
    lib = llama / "build" / "bin"
    inc = [f"-I{llama / 'include'}", f"-I{llama / 'ggml' / 'include'}"]
    (out / f"{name}.c").write_text(source)
    cmd = ["cc", "-O2", "-o", exe, out / f"{name}.c", *inc, f"-L{lib}", f"-Wl,-rpath,{lib}"]
    subprocess.run([*map(str, cmd), "-lllama", "-lggml", "-lggml-base"], check=True)
    return exe


def build_greedy(llama: Path, out: Path) -> Path:
    return build_c(llama, out)


def build_bench(llama: Path, out: Path) -> Path:
    """The timed, batched greedy decoder (BENCH_C): see `llama_bench`."""
    return build_c(llama, out, "bench", BENCH_C)


def llama_bench(
    exe: Path, gguf: Path, prompts: list[list[int]], n: int, threads: int, tmp: Path
) -> tuple[float, float, list[list[int]]]:
    """Greedy-decode every prompt (token ids, one sequence each, all in one batch) for n
    tokens with llama.cpp at `threads` threads, f32 KV cache, no flash attention. Returns
    (prefill seconds, decode tokens/s after the first token, the generated ids per prompt),
    measured as `benchmarks.decode` measures nanoseek's engine."""
    ids = tmp / "bench_ids.txt"
    ids.write_text("".join(" ".join(map(str, p)) + "\n" for p in prompts))
    cmd = [str(exe), str(gguf), str(n), str(threads), str(ids)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()
    t_pre, t_dec = (float(x) for x in out[0].split()[1:])
    gens = [[int(x) for x in line.split()[1:]] for line in out[1:] if line.startswith("gen")]
    return t_pre, len(prompts) * (n - 1) / t_dec, gens


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
