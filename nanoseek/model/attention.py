"""Multi-head Latent Attention (MLA), DeepSeek-V2/V3.

Queries:   x -> wq_a -> q_norm -> wq_b -> heads x (nope + rope)     (or x -> wq when q_lora_rank is None)
Keys/vals: x -> wkv_a -> [c_kv | k_rope];  kv_norm(c_kv) -> wkv_b -> heads x (k_nope, v)

Two forms of the same math, side by side:
- `forward`, the plain path (training, and the reference): keys and values are expanded
  per head from c_kv, then attended.
- `decode`, the absorbed path over the latent cache, which holds only kv_norm(c_kv) and
  the rotated k_rope (kv_lora_rank + rope numbers per token). wkv_b's key half W_uk is
  absorbed into the query and its value half W_uv into the output (DeepSeek-V3's
  inference/model.py):
      q_lat  = einsum("bshd,hdc->bshc", q_nope, W_uk)            # query in latent space
      scores = einsum("bshc,btc->bsht", q_lat, c_kv) + einsum("bshr,btr->bsht", q_rope, k_rope)
      o_lat  = einsum("bsht,btc->bshc", softmax(scores * scale), c_kv)
      out    = einsum("bshc,hdc->bshd", o_lat, W_uv) -> wo
  so attention is multi-query attention over one shared latent "head" [c_kv | k_rope] and
  full keys and values never exist. `fold` rearranges the weights once for this (norm
  weights, the softmax scale, the rope permutation, and W_uk / W_uv when that reads fewer
  bytes, go into the neighbouring matmuls); a test checks decode against forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.indexer import Indexer
from nanoseek.model.norm import RMSNorm, rms_scale, rms_unweighted
from nanoseek.model.quant import mm
from nanoseek.model.rope import apply_rope, rope_permutations, rotate_folded, softmax_scale

# Up to this length, causal bf16 attention on CPU runs faster as two batched matmuls than in
# torch's flash kernel (forward + backward, small's 4 heads of 64: 2.4x at 128 tokens, 1.8x
# at 256, 1.4x at 512; slower from ~1024, where the T x T scores also start to weigh).
BMM_ATTENTION_MAX_LEN = 512
# ... and while a layer's bf16 scores [B, H, T, T] (kept for the backward) stay under 128 MB
BMM_ATTENTION_MAX_SCORES = 1 << 26


def _bmm_attention_wins(q: torch.Tensor, T: int) -> bool:
    if q.device.type != "cpu" or not 1 < T <= BMM_ATTENTION_MAX_LEN:
        return False
    if q.shape[0] * q.shape[2] * T * T > BMM_ATTENTION_MAX_SCORES:
        return False
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu") == torch.bfloat16
    return q.dtype == torch.bfloat16


def causal_attention_bmm(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention of q, k [B, T, H, D] and v [B, T, H, Dv] in bf16 as batched matmuls
    (the scores in bf16, as an eager bf16 model has them) -> [B, T, H, Dv]."""
    B, T, H, Dv = v.shape
    with torch.autocast("cpu", enabled=False):
        q, k, v = (t.to(torch.bfloat16).transpose(1, 2).flatten(0, 1) for t in (q, k, v))
        future = torch.full((T, T), float("-inf"), dtype=torch.bfloat16, device=q.device)
        scores = torch.baddbmm(future.triu(1), q, k.transpose(1, 2), alpha=scale)
        out = torch.bmm(scores.softmax(-1), v)
    return out.view(B, H, T, Dv).transpose(1, 2)


@dataclass
class LayerKV:
    """One layer's latent cache: preallocated buffers c_kv [slots, max_len, kv_lora_rank]
    and k_rope [slots, max_len, rope]. Batch row b lives in buffer row `slots[b]`; attention
    reads the first `length` positions of each row."""

    c_kv: torch.Tensor
    k_rope: torch.Tensor
    slots: torch.Tensor  # [B] long
    length: int
    index_k: torch.Tensor | None = None  # V3.2: the indexer's keys [slots, max_len, index_head_dim]


@dataclass
class DecodeStep:
    """What every layer of a cached step shares, built once per step by the engine."""

    B: int
    T: int
    start: int  # the batch is cache slots start..start+B
    span: torch.Tensor  # arange(S): attend over cache positions [0, S) (S lives in its shape)
    mask: torch.Tensor | None  # [B, H*T or 1, S] additive (0 or -inf); None: all visible
    cos_q: torch.Tensor  # [B, T, 1, R]: [cos | cos] (see rope.rotate_folded)
    sin_q: torch.Tensor  # [B, T, 1, R]: [-sin | sin]
    cos_k: torch.Tensor  # [B*T, R]
    sin_k: torch.Tensor
    rows: torch.Tensor  # [B*T] row of each new latent in one layer's [slots * P] rows
    pos: torch.Tensor | None = None  # [B, T] positions (V3.2's indexer selects among s <= p)

    @property
    def S(self):
        """The context length: a shape, so torch.compile keeps it symbolic (one graph)."""
        return self.span.shape[0]


@dataclass
class CacheRows:
    """A group of layers' cached rows (latents, or V3.2's indexer keys) as ONE tensor
    [layers * slots * P, W]; layer i, slot s, position p is row (i * slots + s) * P + p.
    A step writes its new rows into this tensor itself (index_copy_) and reads views made
    from it. Why one base tensor: under torch.compile, a graph that mutates one of several
    inputs that share storage (per-layer views of one buffer) copies the whole buffer every
    step; a mutated base tensor that no other input aliases is updated in place."""

    buf: torch.Tensor
    slots: int
    P: int  # rows per slot

    def write(self, layer: int, st: DecodeStep, rows: torch.Tensor) -> None:
        self.buf.index_copy_(0, st.rows + layer * self.slots * self.P, rows.to(self.buf.dtype))

    def read(self, layer: int, st: DecodeStep) -> torch.Tensor:
        """This batch's rows of `layer` [B, S, W]: a view."""
        view = self.buf.view(-1, self.slots, self.P, self.buf.shape[-1])
        return view[layer, st.start : st.start + st.B, : st.S]


@dataclass
class FoldedMLA:
    """MLA's weights rearranged once for `MLA.decode` (all [in, out], so x @ w)."""

    w_in: torch.Tensor  # [d, Q + 2C + 2R]: q_a (or q) | c_kv | c_kv * kv_norm | k_rope | swapped
    wq: torch.Tensor | None  # [q_rank, H*(K + 2R)]: per head q_k | q_rope | q_rope swapped
    w_uk: torch.Tensor | None  # [H, nope, C]: when not folded into wq
    w_uv_t: torch.Tensor | None  # [H, C, v]: when not folded into wo
    wo: torch.Tensor  # [H*C, d] (W_uv folded in) or [H*v, d]
    q_eps: torch.Tensor | None  # 0-dim fp32
    kv_eps: torch.Tensor
    q_dim: int  # Q
    k_dim: int  # K: the query's non-rope width per head: C when W_uk is folded, else nope
    # V3.2: the norm weights the indexer's inputs need (attn_norm's, q_norm's), unfolded
    index_norms: tuple[torch.Tensor, torch.Tensor] | None = None


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
        self.indexer = Indexer(cfg) if cfg.has_indexer else None

    def _queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """-> q_nope [B, T, H, nope], q_rope [B, T, H, rope], and the compressed query
        q_norm(wq_a(x)) [B, T, q_lora_rank] (None without q-LoRA), which the indexer reads."""
        B, T, _ = x.shape
        q_lat = None if hasattr(self, "wq") else self.q_norm(self.wq_a(x))
        q = self.wq(x) if q_lat is None else self.wq_b(q_lat)
        q = q.view(B, T, self.n_heads, self.nope + self.rope)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        return q_nope, apply_rope(q_rope, cos, sin), q_lat

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
        q_nope, q_rope, q_lat = self._queries(x, cos, sin)
        c_kv, k_rope = self._latents(x, cos, sin)
        idx = self.indexer  # V3.2; its selection carries no gradient (indexer_kl trains it)
        if kv is None:
            mask = None  # causal
            T = x.shape[1]
            if idx is not None and idx.enabled and T > idx.topk:
                visible = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None]
                with torch.no_grad():
                    keys = idx.keys(x, cos, sin)
                    mask = idx.select(idx.scores(x, q_lat, cos, sin, keys), visible)
            out = self._attend_plain(q_nope, q_rope, c_kv, k_rope, mask=mask)
        else:
            rows = kv.slots[:, None]
            kv.c_kv[rows, positions] = c_kv.to(kv.c_kv.dtype)
            kv.k_rope[rows, positions] = k_rope.to(kv.k_rope.dtype)
            # key s is visible to the query at position p iff s <= p: also hides stale rows
            mask = torch.arange(kv.length, device=x.device)[None, None, :] <= positions[:, :, None]
            if idx is not None:
                if kv.index_k is None:
                    raise ValueError("a V3.2 model needs a cache with the indexer's keys")
                with torch.no_grad():
                    kv.index_k[rows, positions] = idx.keys(x, cos, sin).to(kv.index_k.dtype)
                if idx.enabled and kv.length > idx.topk:
                    keys = kv.index_k[kv.slots, : kv.length].to(x.dtype)
                    with torch.no_grad():
                        mask = idx.select(idx.scores(x, q_lat, cos, sin, keys), mask)
            c_all = kv.c_kv[kv.slots, : kv.length].to(x.dtype)
            r_all = kv.k_rope[kv.slots, : kv.length].to(x.dtype)
            out = self._attend_plain(q_nope, q_rope, c_all, r_all, mask=mask)
        return self.wo(out.flatten(2))

    @torch.no_grad()
    def attention_probs(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        """The attention of x [B, T, d] over the keys `keep` [B or 1, T, T] allows (causal,
        or the indexer's selection) as one distribution per query: heads summed, then
        L1-normalised [B, T, T] float32 (what the V3.2 indexer fits; see indexer_kl)."""
        q_nope, q_rope, _ = self._queries(x, cos, sin)
        c_kv, k_rope = self._latents(x, cos, sin)
        B, T, _ = c_kv.shape
        k_nope = self.wkv_b(c_kv).view(B, T, self.n_heads, -1)[..., : self.nope]
        scores = torch.einsum("bthd,bshd->bhts", q_nope, k_nope)
        scores = scores + torch.einsum("bthr,bsr->bhts", q_rope, k_rope)
        scores = (scores.float() * self.scale).masked_fill(~keep[:, None], float("-inf"))
        p = scores.softmax(-1).sum(1)
        return p / p.sum(-1, keepdim=True)

    def _attend_plain(self, q_nope, q_rope, c_kv, k_rope, mask):
        B, S, _ = c_kv.shape
        T = q_nope.shape[1]
        if mask is not None and mask.shape[0] != B:
            mask = mask.expand(B, -1, -1)
        k_nope, v = (
            self.wkv_b(c_kv)
            .view(B, S, self.n_heads, self.nope + self.v_dim)
            .split([self.nope, self.v_dim], dim=-1)
        )
        k = torch.cat([k_nope, k_rope[:, :, None, :].expand(B, S, self.n_heads, self.rope)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        if mask is None and _bmm_attention_wins(q, T):
            return causal_attention_bmm(q, k, v, self.scale)
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

    # --- the absorbed form, over the latent cache ---------------------------------------
    @torch.no_grad()
    def fold(self, input_norm: RMSNorm) -> FoldedMLA:
        """The weights for `decode`; `input_norm` (the block's attn_norm) goes into w_in."""
        H, nope, v, C, R = self.n_heads, self.nope, self.v_dim, self.kv_rank, self.rope
        perm, swap = rope_permutations(R)
        q_full = self.wq.weight if hasattr(self, "wq") else self.wq_b.weight  # [H*(nope+R), in]
        w_q = q_full.view(H, nope + R, -1) * self.scale
        q_nope, q_rope, q_swap = w_q[:, :nope], w_q[:, nope + perm], w_q[:, nope + swap]
        w = self.wkv_b.weight.view(H, nope + v, C)
        w_uk, w_uv_t = w[:, :nope].contiguous(), w[:, nope:].transpose(1, 2).contiguous()
        q_in, d = w_q.shape[-1], self.wo.weight.shape[0]
        if C * q_in <= nope * (q_in + C):  # W_uk folded into W_q reads no more bytes: fold
            q_nope, w_uk = w_uk.transpose(1, 2) @ q_nope, None  # [H, C, q_in]
        wq = torch.cat([q_nope, q_rope, q_swap], dim=1).flatten(0, 1)
        kv = self.wkv_a.weight
        device = kv.device
        if hasattr(self, "wq"):  # no q compression: queries come straight out of w_in
            q_a, wq, q_eps = wq, None, None
        else:
            q_a = self.wq_a.weight
            wq, q_eps = (wq * self.q_norm.weight).t(), self.q_norm.eps_tensor(device)
        wo = self.wo.weight.view(d, H, v)
        if C * d <= v * (C + d):  # likewise W_uv into W_o: [H*C, d]
            wo, w_uv_t = torch.einsum("hcv,dhv->hcd", w_uv_t, wo).flatten(0, 1), None
        else:
            wo = self.wo.weight.t()
        # c_kv twice: as is (for kv_norm's rms) and times kv_norm's weight (what is cached)
        w_in = torch.cat(
            [q_a, kv[:C], kv[:C] * self.kv_norm.weight[:, None], kv[C + perm], kv[C + swap]]
        )
        w_in = (w_in * input_norm.weight).t()
        k_dim = nope if w_uk is not None else C
        index_norms = None
        if self.indexer is not None:
            index_norms = (input_norm.weight.detach(), self.q_norm.weight.detach())
        return FoldedMLA(
            w_in,
            wq,
            w_uk,
            w_uv_t,
            wo,
            q_eps,
            self.kv_norm.eps_tensor(device),
            q_a.shape[0],
            k_dim,
            index_norms,
        )

    def decode(
        self,
        f: FoldedMLA,
        x: torch.Tensor,
        st: DecodeStep,
        cache: CacheRows,
        layer: int,
        index: CacheRows | None = None,
    ) -> torch.Tensor:
        """x [N = B*T, d], normed without its weight (folded) -> [N, d]. Writes this chunk's
        latents [c_kv | k_rope] into layer `layer` of `cache`, then attends over this batch's
        rows of it [B, S, C + R]. V3.2: `index` holds the indexer keys, likewise."""
        B, T, H, C, R, K = st.B, st.T, self.n_heads, self.kv_rank, self.rope, f.k_dim
        q, c_kv, c_g, k_rope, k_swap = mm(x, f.w_in).split_with_sizes([f.q_dim, C, C, R, R], -1)
        mask = st.mask
        if self.indexer is not None:
            mask = self._index_mask(f, x, q, st, index, layer)
        if f.wq is not None:
            q = mm(rms_unweighted(q, f.q_eps), f.wq)
        q_k, q_rope, q_swap = q.view(B, T, H, K + 2 * R).split_with_sizes([K, R, R], -1)
        c_kv = c_g * rms_scale(c_kv, f.kv_eps)  # kv_norm(c_kv), its weight already in c_g
        k_rope = rotate_folded(k_rope, k_swap, st.cos_k, st.sin_k)
        cache.write(layer, st, torch.cat([c_kv, k_rope], -1))
        kv = cache.read(layer, st)
        if f.w_uk is not None:  # q_lat = q_nope W_uk, when W_uk was not folded into wq
            q_k = (q_k.transpose(1, 2) @ f.w_uk).transpose(1, 2)
        q = torch.cat([q_k, rotate_folded(q_rope, q_swap, st.cos_q, st.sin_q)], dim=-1)
        q = q.transpose(1, 2).reshape(B, H * T, C + R)  # a view when T == 1
        kt = kv.transpose(1, 2)  # one latent "head" [c_kv | k_rope] shared by all query heads
        scores = torch.bmm(q, kt) if mask is None else torch.baddbmm(mask, q, kt)
        probs = scores.softmax(-1, dtype=torch.float32)
        if probs.dtype != kv.dtype:
            probs = probs.to(kv.dtype)
        o = (probs @ kv[..., :C]).view(B, H, T, C)  # o_lat: attention output in latent space
        if f.w_uv_t is not None:  # o = o_lat W_uv, when W_uv was not folded into wo
            o = o @ f.w_uv_t  # [B, H, T, v]
        return mm(o.transpose(1, 2).reshape(B * T, -1), f.wo)

    def _index_mask(
        self, f: FoldedMLA, x, q_a, st: DecodeStep, index: CacheRows | None, layer: int
    ) -> torch.Tensor | None:
        """V3.2 over the cache: write this chunk's indexer keys, then the additive mask
        [B, H*T or 1, S] of each query's index_topk best visible keys (st.mask when every
        visible key fits). The indexer reads the unfolded norms: x and q as the plain
        path sees them."""
        if index is None:
            raise ValueError("a V3.2 model decodes with its indexer keys cached (index=...)")
        idx, R = self.indexer, self.rope
        B, T, S = st.B, st.T, st.S
        attn_w, q_w = f.index_norms
        xw = (x * attn_w).view(B, T, -1)  # attn_norm(h)
        q_lat = (rms_unweighted(q_a, f.q_eps) * q_w).view(B, T, -1)  # q_norm(wq_a(x))
        cos, sin = st.cos_q[:, :, 0, : R // 2], st.sin_q[:, :, 0, R // 2 :]  # [cos|cos], [-sin|sin]
        index.write(layer, st, idx.keys(xw, cos, sin).view(B * T, -1))
        keys = index.read(layer, st)
        if not idx.enabled or S <= idx.topk:
            return st.mask
        visible = torch.arange(S, device=x.device) <= st.pos[:, :, None]  # [B, T, S]
        keep = idx.select(idx.scores(xw, q_lat, cos, sin, keys.to(xw.dtype)), visible)
        mask = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill_(
            ~keep, float("-inf")
        )
        H = self.n_heads
        return mask[:, None].expand(B, H, T, S).reshape(B, H * T, S) if T > 1 else mask
