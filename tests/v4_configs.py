"""A small DeepSeek-V4 config for tests (shared by the model's and the cache's tests)."""

from __future__ import annotations

from nanoseek.config import CSA, HCA, V4Config

YARN = {
    "type": "yarn",
    "factor": 16.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32,
    "beta_slow": 1,
}


def small(**kw) -> V4Config:
    # 16 index heads: an index score is exactly 0 (every head's ReLU at 0) with odds 2^-16,
    # so top-k never breaks ties at 0 (which the two implementations may break differently)
    base = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        head_dim=16,
        qk_rope_head_dim=8,
        q_lora_rank=24,
        o_groups=2,
        o_lora_rank=12,
        sliding_window=8,
        compress_ratios=(0, 4, 8, 4),
        compress_rates={CSA: 4, HCA: 8},
        index_n_heads=16,
        index_head_dim=16,
        index_topk=4,
        hc_mult=4,
        moe_intermediate_size=24,
        n_routed_experts=8,
        num_experts_per_tok=3,
        num_hash_layers=2,
        swiglu_limit=3.0,
        num_nextn_predict_layers=0,
        max_position_embeddings=256,
        rope_scaling=dict(YARN),
    )
    return V4Config(**{**base, **kw})
