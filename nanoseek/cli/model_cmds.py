"""`nanoseek info`: what a model is, before building it."""

from __future__ import annotations

import argparse


def add_model_source(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--preset",
        default=None,
        help="tiny, tiny-v32, tiny-v4, small, small-v32, small-v4, dense-small, deepseek-v3, ...",
    )
    src.add_argument("--config", default=None, help="a config.json or a checkpoint directory")


def load_model_config(args: argparse.Namespace, default: str = "small"):
    from nanoseek.config import ModelConfig, get_preset

    if getattr(args, "config", None):
        return ModelConfig.load(args.config)
    return get_preset(args.preset or default)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameters, KV-cache bytes and FLOPs per token of a model")
    add_model_source(p)
    p.add_argument("--seq-len", type=int, default=4096, help="context length for attention FLOPs")
    p.set_defaults(func=info)


def info(args: argparse.Namespace) -> int:
    from nanoseek.compute import flops_per_token
    from nanoseek.config import kv_cache_bytes_per_token, param_counts
    from nanoseek.utils import human

    cfg = load_model_config(args)
    if not hasattr(cfg, "kv_lora_rank"):  # a V4Config (tiny-v4): counts only
        return _info_v4(args, cfg)
    counts = param_counts(cfg)
    kv = kv_cache_bytes_per_token(cfg, bytes_per_value=2)
    seq = min(args.seq_len, cfg.max_position_embeddings)
    fwd, train = flops_per_token(cfg, seq, training=False), flops_per_token(cfg, seq, training=True)
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    rows = [
        ("model", args.config or (args.preset or "small")),
        (
            "layers",
            f"{cfg.num_hidden_layers} ({cfg.num_hidden_layers - moe_layers} dense, {moe_layers} MoE)",
        ),
        ("hidden / heads", f"{cfg.hidden_size} / {cfg.num_attention_heads}"),
        (
            "experts",
            f"{cfg.n_routed_experts} routed (top {cfg.num_experts_per_tok}) + {cfg.n_shared_experts} shared"
            if cfg.n_routed_experts
            else "none (dense)",
        ),
        ("parameters, total", human(counts["total"])),
        ("parameters, activated", f"{human(counts['activated'])} (excl. input embedding lookup)"),
        ("MTP modules", f"{cfg.num_nextn_predict_layers} ({human(counts['mtp'])} params)"),
        (
            "KV cache / token, latent",
            f"{kv['latent']:,} B (bf16: {cfg.kv_lora_rank}+{cfg.qk_rope_head_dim} per layer)",
        ),
        *(
            [("KV cache / token, indexer", f"{kv['indexer']:,} B (V3.2: one key per layer)")]
            if kv["indexer"]
            else []
        ),
        (
            "KV cache / token, full K+V",
            f"{kv['full']:,} B ({kv['full'] / kv['latent']:.1f}x the latent)",
        ),
        (f"FLOPs / token, forward @ {seq}", human(fwd)),
        (f"FLOPs / token, training @ {seq}", human(train)),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _info_v4(args: argparse.Namespace, cfg) -> int:
    from nanoseek.compute import flops_per_token
    from nanoseek.config import v4_param_counts
    from nanoseek.utils import human

    counts = v4_param_counts(cfg)
    seq = min(args.seq_len, cfg.max_position_embeddings)
    kinds = ", ".join(f"{cfg.layer_types.count(t)} {t}" for t in dict.fromkeys(cfg.layer_types))
    rows = [
        ("model", args.preset),
        ("layers", f"{cfg.num_hidden_layers} ({kinds}; {cfg.num_hash_layers} hash-routed)"),
        ("hidden / heads", f"{cfg.hidden_size} / {cfg.num_attention_heads} x {cfg.head_dim}"),
        ("residual streams", str(cfg.hc_mult)),
        (
            "experts",
            f"{cfg.n_routed_experts} routed (top {cfg.num_experts_per_tok}) + 1 shared",
        ),
        ("parameters, total", human(counts["total"])),
        ("parameters, activated", f"{human(counts['activated'])} (excl. input embedding lookup)"),
        (f"FLOPs / token, forward @ {seq}", human(flops_per_token(cfg, seq, training=False))),
        (f"FLOPs / token, training @ {seq}", human(flops_per_token(cfg, seq, training=True))),
        ("KV cache, decode FLOPs", "see `nanoseek compute context " + str(args.preset) + "`"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
