"""One DeepSeek-V4 block: attention and MoE, each wrapped in a hyper-connection.

The residual is `hc_mult` streams [B, S, N, D] throughout. For each sub-block the
`HyperConnection` collapses the streams into its input (pre), the sub-block runs on the
RMS-normed input, and the streams are updated with its output (post) plus their doubly-
stochastic mix (comb). Names are transformers' DeepseekV4DecoderLayer's (`attn_hc`,
`self_attn`, `input_layernorm`, `ffn_hc`, `mlp`, `post_attention_layernorm`).
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.model.attention_v4 import V4Attention, V4LayerKV
from nanoseek.model.hyper import HyperConnection
from nanoseek.model.moe_v4 import V4MoE
from nanoseek.model.norm import RMSNorm


class V4Block(nn.Module):
    """forward(h [B, S, N, D], position_ids [B, S], input_ids [B, S]) -> h [B, S, N, D].
    The attention and MoE are built by the caller (their settings vary per layer)."""

    def __init__(
        self,
        self_attn: V4Attention,
        mlp: V4MoE,
        hidden_size: int,
        hc_mult: int = 4,
        sinkhorn_iters: int = 20,
        hc_eps: float = 1e-6,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        self.input_layernorm = RMSNorm(hidden_size, norm_eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, norm_eps)
        hc = (hidden_size, hc_mult, sinkhorn_iters, hc_eps, norm_eps)
        self.attn_hc, self.ffn_hc = HyperConnection(*hc), HyperConnection(*hc)

    def forward(
        self,
        h: torch.Tensor,
        position_ids: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        counts: list[torch.Tensor] | None = None,
        cache: V4LayerKV | None = None,
    ) -> torch.Tensor:
        """`counts`: see V4MoE.forward (the MoE's tokens per expert, learned routing only).
        `cache`: this layer's cache, when h is one cached step's tokens (V4Attention)."""
        post, comb, x = self.attn_hc(h)
        out = self.self_attn(self.input_layernorm(x), position_ids, cache)
        h = HyperConnection.update(h, out, post, comb)
        post, comb, x = self.ffn_hc(h)
        out = self.mlp(self.post_attention_layernorm(x), input_ids, counts)
        return HyperConnection.update(h, out, post, comb)
