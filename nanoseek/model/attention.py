"""Multi-head Latent Attention (MLA), DeepSeek-V2/V3.

Queries:   x -> wq_a -> q_norm -> wq_b -> heads x (nope + rope)     (or x -> wq when q_lora_rank is None)
Keys/vals: x -> wkv_a -> [c_kv | k_rope];  kv_norm(c_kv) -> wkv_b -> heads x (k_nope, v)

Here keys and values are expanded per head from c_kv and then attended (the plain path:
training, and the reference for inference). The cache holds only kv_norm(c_kv) and the
rotated k_rope, kv_lora_rank + rope numbers per token; the engine's decode path
(nanoseek/infer/runner.py) attends over them in absorbed form — wkv_b's key half folded
into the query, its value half into the output — and is tested against this one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import apply_rope, softmax_scale


@dataclass
class LayerKV:
    """One layer's latent cache: preallocated buffers c_kv [slots, max_len, kv_lora_rank]
    and k_rope [slots, max_len, rope]. Batch row b lives in buffer row `slots[b]`; attention
    reads the first `length` positions of each row."""

    c_kv: torch.Tensor
    k_rope: torch.Tensor
    slots: torch.Tensor  # [B] long
    length: int


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim = (
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
        )
        self.kv_rank = cfg.kv_lora_rank
        d, h, qk = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.wq = nn.Linear(d, h * qk, bias=False)
        else:
            self.wq_a = nn.Linear(d, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank)  # eps 1e-6 as in the reference, not rms_norm_eps
            self.wq_b = nn.Linear(cfg.q_lora_rank, h * qk, bias=False)
        self.wkv_a = nn.Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, h * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(h * self.v_dim, d, bias=False)
        self.scale = softmax_scale(qk, cfg.rope_scaling)

    def _queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        B, T, _ = x.shape
        q = self.wq(x) if hasattr(self, "wq") else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(B, T, self.n_heads, self.nope + self.rope)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        return q_nope, apply_rope(q_rope, cos, sin)  # [B, T, H, nope], [B, T, H, rope]

    def _latents(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        c_kv, k_rope = self.wkv_a(x).split([self.kv_rank, self.rope], dim=-1)
        return self.kv_norm(c_kv), apply_rope(k_rope, cos, sin)  # [B, T, C], [B, T, rope]

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: LayerKV | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, d]. Without `kv`: causal self-attention over x (training).
        With `kv`: write this chunk's latents at `positions` [B, T] and attend over the
        cache up to each query's own position (prefill or decode, ragged batches)."""
        q_nope, q_rope = self._queries(x, cos, sin)
        c_kv, k_rope = self._latents(x, cos, sin)
        if kv is None:
            out = self._attend_plain(q_nope, q_rope, c_kv, k_rope, mask=None)
        else:
            rows = kv.slots[:, None]
            kv.c_kv[rows, positions] = c_kv.to(kv.c_kv.dtype)
            kv.k_rope[rows, positions] = k_rope.to(kv.k_rope.dtype)
            # key s is visible to the query at position p iff s <= p: also hides stale rows
            mask = torch.arange(kv.length, device=x.device)[None, None, :] <= positions[:, :, None]
            c_all = kv.c_kv[kv.slots, : kv.length].to(x.dtype)
            r_all = kv.k_rope[kv.slots, : kv.length].to(x.dtype)
            out = self._attend_plain(q_nope, q_rope, c_all, r_all, mask=mask)
        return self.wo(out.flatten(2))

    def _attend_plain(self, q_nope, q_rope, c_kv, k_rope, mask):
        B, S, _ = c_kv.shape
        T = q_nope.shape[1]
        k_nope, v = (
            self.wkv_b(c_kv)
            .view(B, S, self.n_heads, self.nope + self.v_dim)
            .split([self.nope, self.v_dim], dim=-1)
        )
        k = torch.cat([k_nope, k_rope[:, :, None, :].expand(B, S, self.n_heads, self.rope)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        attn_mask = None if mask is None else mask[:, None, :, :]  # [B, 1, T, S]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=attn_mask,
            is_causal=mask is None and T > 1,
            scale=self.scale,
        )
        return out.transpose(1, 2)  # [B, T, H, v]
