"""Compute accounting: matmul FLOPs per token for any ModelConfig, a GPU catalog, and what
a training run costs in GPU-hours, days and dollars -- or what MFU a published claim implies.

Conventions: a multiply-add is 2 FLOPs; training is 3x the forward (the backward computes a
gradient for the input and one for the weight of every matmul); only matmuls are counted
(norms, softmax, RoPE and activations are a fraction of a percent); MFU is model FLOPs per
second over the dense peak of the chosen precision, never the 2:4-sparsity headline.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanoseek.config import (
    ModelConfig,
    V4Config,
    any_param_counts,
    attention_matrix_params,
    ffn_matrix_params,
    get_any_preset,
    get_preset,
    param_counts,
)
from nanoseek.utils import human, read_json

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

CATALOG_PATH = Path(__file__).with_name("gpus.toml")
PRECISIONS = ("bf16", "fp8")


class ComputeError(ValueError):
    """Bad input to the compute accounting; the message names the value and the fix."""


# --- quantities: "14.8T", "2.788M", "3e24" -------------------------------------------

_SUFFIX = {"": 1.0, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12, "P": 1e15}
_QUANTITY = re.compile(r"^([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)([KMBGTP]?)$", re.IGNORECASE)


def parse_quantity(text: str | float | int, what: str = "quantity") -> float:
    if isinstance(text, int | float):
        return float(text)
    m = _QUANTITY.match(text.strip().replace(",", "").replace("_", ""))
    if not m:
        raise ComputeError(
            f"{what}: cannot read {text!r} as a number; write it like 14.8T, 2.788M, 671B or 3e24"
        )
    return float(m.group(1)) * _SUFFIX[m.group(2).upper()]


def _positive(what: str, x: float) -> float:
    if not (isinstance(x, int | float) and math.isfinite(x) and x > 0):
        raise ComputeError(f"{what} must be a positive number, got {x!r}")
    return float(x)


def _count(what: str, x: float) -> int:
    if _positive(what, x) != int(x):
        raise ComputeError(f"{what} must be a whole number, got {x!r}")
    return int(x)


def _check_mfu(mfu: float) -> float:
    _positive("MFU", mfu)
    if mfu > 1:
        raise ComputeError(f"MFU is a fraction of peak and cannot exceed 1, got {mfu} (40% is 0.4)")
    return mfu


# --- FLOPs per token -------------------------------------------------------------------


def _attention_macs(c: ModelConfig, ctx: float) -> tuple[float, float]:
    """(projection, score+value) multiply-adds per token of one MLA layer, training path
    (keys and values expanded per head, as DeepSeek trains; the absorbed decode path differs)."""
    scores = c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * ctx  # q.k, then p @ v
    return attention_matrix_params(c), scores


def flops_breakdown(cfg: ModelConfig, seq_len: int, training: bool = True) -> dict[str, float]:
    """Matmul FLOPs per token by component, averaged over the positions of a causal sequence."""
    seq_len = int(_positive("seq_len", seq_len))
    # Causal attention: position i (1-based) attends to i keys, so (L + 1) / 2 on average.
    ctx = (seq_len + 1) / 2
    parts = dict.fromkeys(
        (
            "attention_proj",
            "attention_scores",
            "gate",
            "routed_experts",
            "shared_experts",
            "dense_mlp",
            "head",
            "mtp",
        ),
        0.0,
    )
    proj, scores = _attention_macs(cfg, ctx)
    for layer_id in range(cfg.num_hidden_layers):
        parts["attention_proj"] += proj
        parts["attention_scores"] += scores
        for k, v in ffn_matrix_params(cfg, layer_id).items():
            parts[k] += v
    head = cfg.hidden_size * cfg.vocab_size
    parts["head"] = head
    # Each MTP module: eh_proj over [h; emb] (2d -> d), one MoE block, the shared head.
    mtp_block = proj + scores + sum(ffn_matrix_params(cfg, cfg.num_hidden_layers).values())
    parts["mtp"] = cfg.num_nextn_predict_layers * (2 * cfg.hidden_size**2 + mtp_block + head)
    scale = 2 * (3 if training else 1)
    return {k: scale * v for k, v in parts.items()}


def flops_per_token(cfg: ModelConfig | V4Config, seq_len: int, training: bool = True) -> float:
    """Matmul FLOPs per token of a causal sequence of seq_len, training (3x) or forward."""
    if isinstance(cfg, V4Config):
        return v4_flops_per_token(cfg, seq_len, training)
    return sum(flops_breakdown(cfg, seq_len, training).values())


def v4_flops_per_token(cfg: V4Config, seq_len: int, training: bool = True) -> float:
    """DeepSeek-V4: 2 FLOPs per activated parameter (embedding lookup out, head in, MTP out:
    as decode_flops counts them) plus the attention and indexer of each position, averaged
    over the positions of a causal sequence (position t reads what a decode step with t
    tokens cached reads, see decode_flops); training is 3x."""
    seq_len = int(_positive("seq_len", seq_len))
    t = torch.arange(1, seq_len + 1, dtype=torch.float64)  # each position's context
    macs = any_param_counts(cfg)["activated"] + _v4_attention_macs(cfg, t).mean().item()
    return 2.0 * (3 if training else 1) * macs


def _v4_attention_macs(cfg: V4Config, context: torch.Tensor) -> torch.Tensor:
    """Attention and indexer multiply-adds, all layers, of a token reading `context` tokens
    (a tensor of contexts): decode_flops' count, vectorised over the positions."""
    per_key = cfg.num_attention_heads * 2 * cfg.head_dim
    index_key = cfg.index_n_heads * cfg.index_head_dim
    csa = cfg.compress_rates["compressed_sparse_attention"]
    total = torch.zeros_like(context)
    for ratio, n_layers in cfg.layer_counts.items():
        keys = context.clamp(max=cfg.sliding_window)
        index = torch.zeros_like(context)
        if ratio == csa:  # the indexer scores every entry, attention reads index_topk
            entries = torch.div(context, csa, rounding_mode="floor")
            index = index_key * entries
            keys = keys + entries.clamp(max=cfg.index_topk)
        elif ratio:  # HCA: every entry
            keys = keys + torch.div(context, ratio, rounding_mode="floor")
        total += n_layers * (per_key * keys + index)
    return total


def six_n_flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """The rule of thumb 6 * N_activated, and with the causal attention term added, for
    comparison with the exact count (which also has the MTP modules)."""
    n_active = param_counts(cfg)["activated"]
    attn = flops_breakdown(cfg, seq_len)["attention_scores"]
    return {"six_n": 6.0 * n_active, "six_n_plus_attention": 6.0 * n_active + attn}


# --- long context: the FLOPs of one new token and the KV cache, V3 / V3.2 / V4 -----------
#
# Decode: one new token at position L attends to L cached tokens. Weights cost 2 FLOPs per
# activated parameter (embedding lookup out, head in, MTP out), as param_counts counts them.
# Attention is counted the way each model decodes from its cache:
# - V3 / V3.2 MLA, absorbed ("MQA mode"): each of h heads scores the 512 + 64 latent of
#   every key it reads and sums 512-wide latent values: h * (2 * kv_lora + rope) MACs a key.
#   V3 reads all L keys. V3.2's lightning indexer scores all L keys (index_n_heads *
#   index_head_dim MACs each), then MLA reads index_topk of them.
# - V4 shared-KV MQA, head_dim D: h * 2D MACs a key read. Every layer reads its last
#   sliding_window tokens; a CSA layer also reads index_topk of its L/4 compressed entries,
#   chosen by an indexer that scores all L/4; an HCA layer reads all L/128 entries.
# KV cache per layer for L tokens: V3 L * (kv_lora + rope); V3.2 adds the indexer's key,
# L * index_head_dim; V4 keeps min(L, window) rows of D, plus L/4 entries of D and L/4
# indexer keys (CSA) or L/128 entries of D (HCA).

AnyConfig = ModelConfig | V4Config


def _context(what: str, L: float) -> int:
    return _count(what, L)


def decode_flops(cfg: AnyConfig, context: int) -> dict[str, float]:
    """FLOPs of one new token with `context` tokens cached (forward only), by part:
    weights (2 x activated parameters), indexer (scoring the context), attention (the
    keys each layer reads)."""
    L = _context("context length", context)
    weights = 2.0 * any_param_counts(cfg)["activated"]
    indexer = attention = 0.0
    if isinstance(cfg, V4Config):
        per_key = cfg.num_attention_heads * 2 * cfg.head_dim
        index_key = cfg.index_n_heads * cfg.index_head_dim
        for ratio in cfg.compress_ratios:
            keys = min(L, cfg.sliding_window)
            if ratio == 4:
                entries = L // 4
                indexer += index_key * entries
                keys += min(entries, cfg.index_topk)
            elif ratio:
                keys += L // ratio
            attention += per_key * keys
    else:
        per_key = cfg.num_attention_heads * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        keys = L
        if cfg.has_indexer:
            indexer = cfg.num_hidden_layers * cfg.index_n_heads * cfg.index_head_dim * L
            keys = min(L, cfg.index_topk)
        attention = cfg.num_hidden_layers * per_key * keys
    parts = {"weights": weights, "indexer": 2.0 * indexer, "attention": 2.0 * attention}
    return {**parts, "total": sum(parts.values())}


KV_FORMATS = ("bf16", "release")


def _kv_entry_bytes(cfg: AnyConfig, fmt: str) -> tuple[float, float]:
    """(bytes of one cached entry, bytes of one indexer key) in a KV format.

    bf16: every value 2 bytes. release: as the checkpoints' inference code stores them --
    V3 / V3.2 MLA latent as FlashMLA's FP8 layout (512 FP8 + one fp32 scale per 128 + 64
    BF16 RoPE = 656 B), V3.2 indexer key FP8 + one fp32 scale (132 B); V4 entries FP8 except
    the BF16 RoPE dims (448 + 128 = 576 B) and indexer keys FP4 (64 B), scales left out.
    """
    if fmt not in KV_FORMATS:
        raise ComputeError(f"KV format must be one of {', '.join(KV_FORMATS)}, got {fmt!r}")
    rope = cfg.qk_rope_head_dim
    if isinstance(cfg, V4Config):
        if fmt == "bf16":
            return 2.0 * cfg.head_dim, 2.0 * cfg.index_head_dim
        return (cfg.head_dim - rope) + 2.0 * rope, cfg.index_head_dim / 2
    if fmt == "bf16":
        return 2.0 * (cfg.kv_lora_rank + rope), 2.0 * cfg.index_head_dim
    latent = cfg.kv_lora_rank + 4 * math.ceil(cfg.kv_lora_rank / 128) + 2.0 * rope
    return latent, cfg.index_head_dim + 4.0


def kv_cache_bytes(cfg: AnyConfig, context: int, fmt: str = "bf16") -> dict[str, float]:
    """KV cache of one sequence of `context` tokens, all layers, by part: latent (V3, V3.2)
    or compressed entries (V4), indexer keys, the sliding window's rows (V4)."""
    L = _context("context length", context)
    entry, index_key = _kv_entry_bytes(cfg, fmt)
    main = indexer = window = 0.0
    if isinstance(cfg, V4Config):
        for ratio in cfg.compress_ratios:
            window += min(L, cfg.sliding_window) * entry
            if ratio:
                main += (L // ratio) * entry
            if ratio == 4:
                indexer += (L // 4) * index_key
    else:
        main = cfg.num_hidden_layers * L * entry
        if cfg.has_indexer:
            indexer = cfg.num_hidden_layers * L * index_key
    parts = {
        "compressed" if isinstance(cfg, V4Config) else "latent": main,
        "indexer": indexer,
        "window": window,
    }
    total = sum(parts.values())
    return {**parts, "total": total, "per_token": total / L}


def context_costs(
    cfg: AnyConfig, context: int, fmt: str = "bf16", name: str | None = None
) -> dict[str, Any]:
    """decode_flops and kv_cache_bytes at one context length, flat."""
    p = any_param_counts(cfg)
    f = decode_flops(cfg, context)
    kv = kv_cache_bytes(cfg, context, fmt)
    return {
        "model": name,
        "model_type": cfg.model_type,
        "context": int(context),
        "params_total": p["total"],
        "params_activated": p["activated"],
        "flops_per_token": f["total"],
        **{f"flops_{k}": v for k, v in f.items() if k != "total"},
        "kv_format": fmt,
        "kv_cache_bytes": kv["total"],
        "kv_cache_bytes_per_token": kv["per_token"],
    }


def family_ratio(
    cfg: AnyConfig, ref: AnyConfig, context: int, fmt: str = "bf16"
) -> dict[str, float]:
    """cfg's single-token FLOPs and KV cache as fractions of ref's, at `context` tokens
    (the V4 report's headline: V4-Pro against V3.2 at 1M is 27% and 10%)."""
    a, b = decode_flops(cfg, context), decode_flops(ref, context)
    ka, kb = kv_cache_bytes(cfg, context, fmt), kv_cache_bytes(ref, context, fmt)
    return {"flops_ratio": a["total"] / b["total"], "kv_cache_ratio": ka["total"] / kb["total"]}


FAMILY = ("deepseek-v3", "deepseek-v32", "deepseek-v4-flash", "deepseek-v4-pro")


def plot_family(
    out: str | Path,
    presets: tuple[str, ...] = FAMILY,
    fmt: str = "bf16",
    max_context: int = 1 << 20,
) -> Path:
    """FLOPs of one new token and KV cache bytes against context length, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nanoseek.utils import atomic_path

    contexts = sorted({int(2 ** (i / 4)) for i in range(40, 4 * int(math.log2(max_context)) + 1)})
    fig, (ax_f, ax_kv) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in presets:
        cfg = get_any_preset(name)
        ax_f.loglog(contexts, [decode_flops(cfg, L)["total"] for L in contexts], label=name)
        ax_kv.loglog(
            contexts,
            [kv_cache_bytes(cfg, L, fmt)["total"] / 2**30 for L in contexts],
            label=name,
        )
    for ax, ylabel in (
        (ax_f, "FLOPs for one new token"),
        (ax_kv, f"KV cache of one sequence (GiB, {fmt} format)"),
    ):
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        for L in (4096, 131072, 1 << 20):
            if L <= max_context:
                ax.axvline(L, color="grey", lw=0.6, ls=":")
    ax_f.legend(fontsize=8, loc="upper left")
    fig.suptitle("DeepSeek decode cost against context length (from the configs)")
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return out


# --- this machine's matmul peak ----------------------------------------------------------

_PEAK_CACHE: dict[tuple[torch.dtype, str], float] = {}


def measure_matmul_peak(dtype: torch.dtype = torch.float32, device: str = "cpu") -> float:
    """This machine's dense matmul rate in FLOP/s: the best over a few square sizes of the
    median of 5 timed loops. A loop of several matmuls (~40 ms) averages out thread-pool
    wake-ups, and the median ignores a loop a busy core slowed down, so run-to-run spread
    is small; a single best-of-N matmul rewarded lucky timer reads. Under 1 s per dtype."""
    key = (dtype, str(device))
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    best = 0.0
    for n in (512, 1024, 2048):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.mm(a, b)  # warm-up: first call pays for allocation and kernel selection
        sync()
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        once = time.perf_counter() - t0
        if once > 0.1:  # no fast kernel for this dtype here (bf16 on a CPU without AVX512-BF16
            best = max(best, 2 * n**3 / once)  # or AMX runs emulated): one timing says enough,
            break  # and larger sizes would take minutes
        reps = max(1, round(0.04 / once))  # loops of ~40 ms
        rates = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b)
            sync()
            rates.append(2 * n**3 * reps / (time.perf_counter() - t0))
        best = max(best, sorted(rates)[len(rates) // 2])
    _PEAK_CACHE[key] = best
    return best


# --- GPU catalog -----------------------------------------------------------------------


@dataclass(frozen=True)
class GPU:
    key: str
    name: str
    bf16_flops: float  # dense peak, FLOP/s
    fp8_flops: float | None
    memory_gb: float | None
    bandwidth_tbs: float | None
    price_usd_per_hour: float
    source: str = ""
    aliases: tuple[str, ...] = field(default=(), repr=False)

    def peak(self, precision: str) -> float:
        if precision not in PRECISIONS:
            raise ComputeError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
            )
        if precision == "fp8":
            if self.fp8_flops is None:
                raise ComputeError(f"{self.name} has no FP8 tensor cores; use --precision bf16")
            return self.fp8_flops
        return self.bf16_flops


def _gpu_from_table(key: str, t: dict[str, Any], source: str) -> GPU:
    def num(name: str, required: bool = False) -> float | None:
        if name not in t:
            if required:
                raise ComputeError(f"{source}: [{key}] needs {name} (a positive number)")
            return None
        try:
            return _positive(f"{source}: [{key}] {name}", t[name])
        except ComputeError:
            if name == "price_usd_per_hour" and t[name] == 0:
                return 0.0  # free hardware (this machine) is allowed
            raise

    tflops = num("bf16_tflops", required=True)
    fp8 = num("fp8_tflops")
    return GPU(
        key=key,
        name=str(t.get("name", key)),
        bf16_flops=tflops * 1e12,
        fp8_flops=fp8 * 1e12 if fp8 else None,
        memory_gb=num("memory_gb"),
        bandwidth_tbs=num("bandwidth_tbs"),
        price_usd_per_hour=num("price_usd_per_hour", required=True),
        source=str(t.get("source", "")),
        aliases=tuple(t.get("aliases", ())),
    )


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ComputeError(f"{path}: no such GPU file; give a TOML file like nanoseek/gpus.toml")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ComputeError(f"{path}: not valid TOML ({e})") from e


def load_catalog(user_file: str | Path | None = None) -> dict[str, GPU]:
    """The built-in catalog, with a user file's fields laid over it (new GPUs may be added)."""
    tables = _read_toml(CATALOG_PATH)
    user_file = user_file or os.environ.get("NANOSEEK_GPUS")
    source = str(CATALOG_PATH)
    if user_file:
        source = str(user_file)
        for key, t in _read_toml(Path(user_file)).items():
            if not isinstance(t, dict):
                raise ComputeError(f"{user_file}: {key!r} must be a table like [H100]")
            tables[key] = {**tables.get(key, {}), **t}
    return {key: _gpu_from_table(key, t, source) for key, t in tables.items()}


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.lower())


def this_machine() -> GPU:
    """The local accelerator (or CPU), with its BF16 matmul peak measured, not looked up."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        name = torch.cuda.get_device_name()
        memory = torch.cuda.get_device_properties(0).total_memory / 1e9
    else:
        name = f"this machine (CPU, {torch.get_num_threads()} threads)"
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return GPU(
        "this",
        name,
        measure_matmul_peak(torch.bfloat16, device),
        None,
        memory,
        None,
        0.0,
        source="measured by nanoseek.compute.measure_matmul_peak",
    )


def find_gpu(name: str, catalog: dict[str, GPU] | None = None) -> GPU:
    if _norm(name) in ("this", "local", "cpu", "thismachine"):
        return this_machine()
    catalog = catalog if catalog is not None else load_catalog()
    for gpu in catalog.values():
        if _norm(name) in {_norm(n) for n in (gpu.key, gpu.name, *gpu.aliases)}:
            return gpu
    raise ComputeError(
        f"unknown GPU {name!r}; choose one of {', '.join(catalog)} or 'this' "
        "(or describe it in a --gpu-file)"
    )


# --- what a run costs, what a claim implies, what a fleet can do --------------------------


def judge_mfu(mfu: float) -> tuple[str, str]:
    """(verdict, why) for an MFU against published large-run numbers (38-55% of dense peak)."""
    if mfu > 1:
        return "impossible", "more FLOPs than the GPUs can do at 100% of peak"
    if mfu > 0.6:
        return "implausible", "above the best published large-scale MFU (~55%, MegaScale)"
    if mfu >= 0.3:
        return "plausible", "within the range of well-tuned large runs (38-55% published)"
    if mfu >= 0.15:
        return "plausible", "a typical utilisation for large runs, MoE and FP8 runs especially"
    return "easily met", "well below what large runs achieve; the claim leaves room to spare"


def _model_numbers(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    p = param_counts(cfg)
    return {
        "params_total": p["total"],
        "params_activated": p["activated"],
        "seq_len": seq_len,
        "flops_per_token": flops_per_token(cfg, seq_len),
    }


def estimate_training(
    cfg: ModelConfig,
    tokens: float,
    gpu: GPU,
    gpus: int,
    mfu: float,
    seq_len: int = 4096,
    precision: str = "bf16",
    price: float | None = None,
) -> dict[str, Any]:
    tokens, gpus = _positive("tokens", tokens), _count("GPU count", gpus)
    _check_mfu(mfu)
    price = gpu.price_usd_per_hour if price is None else _positive("price", price)
    out = _model_numbers(cfg, seq_len)
    total = out["flops_per_token"] * tokens
    gpu_hours = total / (gpu.peak(precision) * mfu) / 3600
    out.update(
        tokens=tokens,
        total_flops=total,
        gpu=gpu.name,
        gpus=gpus,
        precision=precision,
        peak_flops_per_gpu=gpu.peak(precision),
        mfu=mfu,
        gpu_hours=gpu_hours,
        wall_days=gpu_hours / gpus / 24,
        price_usd_per_gpu_hour=price,
        cost_usd=gpu_hours * price,
    )
    return out


def training_memory(
    cfg: ModelConfig,
    gpus: int,
    ep: int = 1,
    seq_len: int = 4096,
    micro_batch: int = 1,
    parallel: str = "fsdp",
    gpu: GPU | None = None,
    optim_states: str = "fp32",
) -> dict[str, Any]:
    """Bytes per GPU to train `cfg` the way `nanoseek train` spreads it (docs/distributed.md):
    dense parameters sharded over all GPUs (FSDP2) or replicated (DDP), routed experts split
    over `ep` GPUs (and replicated over gpus / ep), fp32 master weights and gradients, AdamW's
    two moments in `optim_states` (fp32, or bf16 as DeepSeek-V3 keeps them), bf16 matmuls.
    Activations are an estimate, per micro-batch of `micro_batch` x `seq_len` tokens: the
    tensors each block keeps for its backward, as nanoseek runs today (all kept), and with
    each block recomputed in the backward (activation checkpointing, which nanoseek does not
    do yet)."""
    gpus, ep = _count("GPU count", gpus), _count("EP size", ep)
    if gpus % ep or cfg.n_routed_experts % ep:
        raise ComputeError(f"--ep {ep} must divide the GPU count ({gpus}) and the experts")
    if parallel not in ("fsdp", "ddp"):
        raise ComputeError(f"parallel must be fsdp or ddp, got {parallel!r}")
    if optim_states not in ("fp32", "bf16"):
        raise ComputeError(f"optimizer states must be fp32 or bf16, got {optim_states!r}")
    moment_bytes = 8 if optim_states == "fp32" else 4  # two moments a parameter
    d, h, k = cfg.hidden_size, cfg.num_attention_heads, cfg.num_experts_per_tok
    counts = param_counts(cfg, include_mtp=True)
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    moe_layers += cfg.num_nextn_predict_layers  # MTP blocks are MoE blocks
    routed = moe_layers * cfg.n_routed_experts * 3 * d * cfg.moe_intermediate_size
    dense = counts["total"] - routed
    local = dense / (gpus if parallel == "fsdp" else 1) + routed / ep
    # bf16 copies FSDP2 gathers: the block running and the next one, prefetched
    block_dense = (dense - counts["embedding"]) / max(cfg.num_hidden_layers, 1)
    gathered = 2 * 2 * block_dense if parallel == "fsdp" and gpus > 1 else 0

    # activations kept per token per block (bf16 elements), roughly: attention's norm out,
    # q/kv latents, per-head q k v and output, residual; the MoE's norm out, gate logits,
    # k dispatched copies in and out, each expert's gate/up/act, the shared expert
    attn = 2 * d + (cfg.q_lora_rank or 0) + cfg.kv_lora_rank + cfg.qk_rope_head_dim
    attn += h * (2 * cfg.qk_head_dim + 2 * cfg.v_head_dim)
    inter = cfg.moe_intermediate_size
    moe = 2 * d + 2 * cfg.n_routed_experts + k * (2 * d + 3 * inter)
    moe += cfg.n_shared_experts * 3 * inter
    mlp = 2 * d + 3 * cfg.intermediate_size
    per_token = sum(
        attn + (moe if cfg.is_moe_layer(i) else mlp) for i in range(cfg.num_hidden_layers)
    )
    per_token += cfg.num_nextn_predict_layers * (attn + moe + 3 * d)
    tokens = micro_batch * seq_len
    heads = 1 + cfg.num_nextn_predict_layers  # the loss keeps d logits per head, bf16
    logits = tokens * cfg.vocab_size * 2 * heads
    kept = 2 * tokens * per_token + logits
    blocks = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    biggest = max(attn + moe, attn + mlp)
    recomputed = 2 * tokens * (d * blocks + biggest) + logits

    out: dict[str, Any] = {
        "params_total": counts["total"],
        "params_routed_experts": routed,
        "params_per_gpu": local,
        "gpus": gpus,
        "ep": ep,
        "layout": f"{parallel.upper()} x {gpus} dense, experts over {ep} ({gpus // ep} copies)",
        "weights_fp32_gb": 4 * local / 1e9,
        "grads_fp32_gb": 4 * local / 1e9,
        "adam_moments_gb": moment_bytes * local / 1e9,
        "gathered_bf16_gb": gathered / 1e9,
        "activations_gb": kept / 1e9,
        "activations_recomputed_gb": recomputed / 1e9,
        "total_gb": ((8 + moment_bytes) * local + gathered + kept) / 1e9,
        "total_recomputed_gb": ((8 + moment_bytes) * local + gathered + recomputed) / 1e9,
    }
    if gpu is not None and gpu.memory_gb:
        out["gpu"] = gpu.name
        out["gpu_memory_gb"] = gpu.memory_gb
    return out


def check_claim(
    cfg: ModelConfig,
    tokens: float,
    gpu: GPU,
    gpu_hours: float,
    seq_len: int = 4096,
    precision: str = "bf16",
    price: float | None = None,
) -> dict[str, Any]:
    tokens, gpu_hours = _positive("tokens", tokens), _positive("GPU-hours", gpu_hours)
    price = gpu.price_usd_per_hour if price is None else _positive("price", price)
    out = _model_numbers(cfg, seq_len)
    total = out["flops_per_token"] * tokens
    achieved = total / (gpu_hours * 3600)  # model FLOP/s each GPU must have sustained
    mfu_bf16 = achieved / gpu.bf16_flops
    mfu_fp8 = achieved / gpu.fp8_flops if gpu.fp8_flops else None
    implied = achieved / gpu.peak(precision)
    verdict, why = judge_mfu(implied)
    text = (
        f"{human(tokens, 4)} tokens need {total:.3g} FLOPs; {human(gpu_hours, 4)} "
        f"{gpu.name} GPU-hours deliver that at {achieved / 1e12:.0f} TFLOP/s per GPU: "
        f"{mfu_bf16:.1%} of the dense BF16 peak"
        + (f" and {mfu_fp8:.1%} of the dense FP8 peak." if mfu_fp8 is not None else ".")
        + f" Against the {precision.upper()} peak, {implied:.1%} is {verdict}: {why}."
    )
    if precision == "bf16" and mfu_fp8 is not None:
        text += (
            " If the matmuls ran in FP8, the FP8 peak is the honest denominator"
            " (rerun with --precision fp8); published MFUs are quoted against BF16."
        )
    elif precision == "fp8":
        text += (
            " FP8 is the honest denominator when the matmuls ran in FP8; the BF16 figure"
            " is only comparable with the published (BF16) MFUs."
        )
    out.update(
        tokens=tokens,
        total_flops=total,
        gpu=gpu.name,
        gpu_hours=gpu_hours,
        precision=precision,
        achieved_flops_per_gpu=achieved,
        implied_mfu=implied,
        implied_mfu_bf16=mfu_bf16,
        implied_mfu_fp8=mfu_fp8,
        verdict=verdict,
        price_usd_per_gpu_hour=price,
        cost_usd=gpu_hours * price,
        explanation=text,
    )
    return out


def compute_optimal(total_flops: float, tokens_per_param: float = 20.0) -> tuple[float, float]:
    """Chinchilla (Hoffmann et al. 2022): C = 6 N D with D ~ 20 N. Returns (N, D)."""
    n = math.sqrt(total_flops / (6 * tokens_per_param))
    return n, tokens_per_param * n


def fleet_capacity(
    gpu: GPU,
    gpus: int,
    days: float,
    mfu: float,
    cfg: ModelConfig | None = None,
    seq_len: int = 4096,
    precision: str = "bf16",
    tokens_per_param: float = 20.0,
    price: float | None = None,
) -> dict[str, Any]:
    gpus, days = _count("GPU count", gpus), _positive("days", days)
    _check_mfu(mfu)
    price = gpu.price_usd_per_hour if price is None else _positive("price", price)
    gpu_hours = gpus * days * 24
    total = gpu_hours * 3600 * gpu.peak(precision) * mfu
    n_opt, d_opt = compute_optimal(total, _positive("tokens per parameter", tokens_per_param))
    out: dict[str, Any] = dict(
        gpu=gpu.name,
        gpus=gpus,
        days=days,
        mfu=mfu,
        precision=precision,
        gpu_hours=gpu_hours,
        total_flops=total,
        price_usd_per_gpu_hour=price,
        cost_usd=gpu_hours * price,
        optimal_params=n_opt,
        optimal_tokens=d_opt,
    )
    if cfg is not None:
        out.update(_model_numbers(cfg, seq_len))
        out["tokens"] = total / out["flops_per_token"]
    return out


# --- a finished nanoseek run ---------------------------------------------------------------

RUN_KEYS = ("tokens_seen", "wall_seconds", "seq_len")


def run_report(
    run_dir: str | Path,
    catalog: dict[str, GPU] | None = None,
    mfu: float = 0.4,
    precision: str = "bf16",
) -> dict[str, Any]:
    run_dir = Path(run_dir)
    path = run_dir / "summary.json"
    if not path.exists():
        raise ComputeError(f"{path}: no summary.json; point at a finished run (runs/NAME)")
    s = read_json(path, "a run summary", ComputeError)
    missing = [k for k in RUN_KEYS if s.get(k) is None]
    if missing:
        raise ComputeError(f"{path}: missing {', '.join(missing)}; was the run finished?")
    if (run_dir / "config.json").exists():
        cfg = ModelConfig.load(run_dir)
    elif s.get("preset"):
        cfg = get_preset(s["preset"])
    else:
        raise ComputeError(f"{run_dir}: no config.json and no preset in summary.json")
    _check_mfu(mfu)
    tokens = _positive("tokens_seen", s["tokens_seen"])
    wall = _positive("wall_seconds", s["wall_seconds"])
    out: dict[str, Any] = {
        "run": run_dir.name,
        "preset": s.get("preset"),
        "device": s.get("device"),
        "dtype": s.get("dtype"),
    }
    out.update(_model_numbers(cfg, int(s["seq_len"])))
    recomputed = out.pop("flops_per_token")
    fpt = float(s.get("flops_per_token") or recomputed)
    total = float(s.get("total_flops") or fpt * tokens)
    out.update(
        tokens_seen=tokens,
        wall_seconds=wall,
        tokens_per_second=tokens / wall,
        flops_per_token=fpt,
        flops_per_token_recomputed=recomputed,
        total_flops=total,
        achieved_flops_per_s=total / wall,
        peak_flops=s.get("peak_flops"),
        mfu=s.get("mfu"),
    )
    if out["mfu"] is None and out["peak_flops"]:
        out["mfu"] = total / wall / float(out["peak_flops"])
    if abs(fpt / recomputed - 1) > 0.01:
        out["note"] = (
            f"summary.json's flops_per_token ({fpt:.4g}) differs from the config's "
            f"({recomputed:.4g}) by more than 1%"
        )
    out["assumed_mfu_on_gpus"] = mfu
    for gpu in (catalog if catalog is not None else load_catalog()).values():
        if precision == "fp8" and gpu.fp8_flops is None:
            continue
        hours = total / (gpu.peak(precision) * mfu) / 3600
        out[f"{gpu.key}_gpu_hours"] = hours
        out[f"{gpu.key}_cost_usd"] = hours * gpu.price_usd_per_hour
    return out


# --- plot: cost and GPU-days against model size -------------------------------------------


def plot_cost(
    out: str | Path,
    gpus: tuple[GPU, ...],
    mfu: float = 0.4,
    tokens_per_param: float = 20.0,
    precision: str = "bf16",
    marker: dict[str, Any] | None = None,
) -> Path:
    """Compute-optimal dense training (D = tokens_per_param * N, C = 6 N D) on each GPU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nanoseek.utils import atomic_path

    _check_mfu(mfu)
    sizes = [10 ** (8 + i / 10) for i in range(0, 41)]  # 100M .. 1T parameters
    fig, (ax_days, ax_cost) = plt.subplots(1, 2, figsize=(11, 4.2))
    for gpu in gpus:
        hours = [6 * n * tokens_per_param * n / (gpu.peak(precision) * mfu) / 3600 for n in sizes]
        label = f"{gpu.name} (${gpu.price_usd_per_hour:.2f}/h)"
        ax_days.loglog(sizes, [h / 24 for h in hours], label=label)
        ax_cost.loglog(sizes, [h * gpu.price_usd_per_hour for h in hours], label=label)
    if marker:
        ax_days.loglog([marker["params"]], [marker["gpu_hours"] / 24], "k*", ms=11)
        ax_cost.loglog([marker["params"]], [marker["cost_usd"]], "k*", ms=11, label=marker["label"])
    for ax, ylabel in ((ax_days, "GPU-days"), (ax_cost, "cost (USD)")):
        ax.set_xlabel("parameters N (activated, for MoE)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_cost.legend(fontsize=8, loc="upper left")
    fig.suptitle(
        f"Compute-optimal training, D = {tokens_per_param:g} N tokens, "
        f"{precision.upper()} at {mfu:.0%} MFU"
    )
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return out


__all__ = [
    "ComputeError",
    "GPU",
    "parse_quantity",
    "flops_breakdown",
    "flops_per_token",
    "six_n_flops_per_token",
    "measure_matmul_peak",
    "load_catalog",
    "find_gpu",
    "this_machine",
    "judge_mfu",
    "estimate_training",
    "check_claim",
    "compute_optimal",
    "fleet_capacity",
    "run_report",
    "plot_cost",
    "decode_flops",
    "kv_cache_bytes",
    "KV_FORMATS",
    "context_costs",
    "family_ratio",
    "plot_family",
]
