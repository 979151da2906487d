"""ModelRunner: runs the model over the latent cache, for prefill, decode and verify steps.

Two paths over the same cache and weights:
- `absorbed` (default): a lean forward written for inference. W_kvb's key half is folded
  into the query (q_lat = q_nope W_uk, per head) and its value half into the output
  (o = o_lat W_uv), so attention is multi-query attention over the cached latents
  `[c_kv | k_rope]` and full keys/values never exist. Weights are rearranged once here.
- `plain`: the model's own forward (`Transformer.forward(kv=..., absorb=False)`), which
  re-expands keys and values from the latents: the reference the fast path is tested against.

At small sizes a decode step is all dispatch overhead, so the fast path counts ops: one
input projection for q_a and the latents, the softmax scale folded into W_qb, one mask and
one cos/sin per step (not per layer), one fused attention call, and for a handful of tokens
an MoE that gathers each token's experts and runs them as one batched matmul, without the
host sync of the sort-by-expert path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanoseek.infer.cache import KVCache
from nanoseek.model.moe import MLP, MoE
from nanoseek.model.norm import RMSNorm
from nanoseek.model.transformer import Block, Transformer

GATHER_EXPERTS_MAX_BYTES = 8 << 20  # above this, copying per-token expert weights costs more


def _rope(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
    """RoPE on x whose rope dims are already in [evens | odds] order (the permutation is
    folded into the weights): with cos2 = [cos | cos] and sin2 = [-sin | sin] this is
    apply_rope's [x1 cos - x2 sin | x2 cos + x1 sin], in four ops."""
    half = x.shape[-1] // 2
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    return torch.addcmul(x * cos2, swapped, sin2)


@dataclass
class _AttnWeights:
    w_in: torch.Tensor  # [Q + C + R, d]: q_a (or q itself) and the latents in one matmul
    wq: torch.Tensor | None  # [H*(K + R), q_rank]: q_a -> per-head query, scale folded in
    w_uk: torch.Tensor | None  # [H, nope, C]: W_kvb's key half, when not folded into wq
    w_uv_t: torch.Tensor  # [H, C, v]: W_kvb's value half, applied after attention
    q_dim: int  # Q
    k_dim: int  # K: the query's non-rope width per head, C when W_uk is folded, else nope


@dataclass
class _Step:
    """Everything a layer needs that depends only on the step, built once per step."""

    S: int  # attend over cache positions [0, S)
    mask: torch.Tensor  # [B, H*T, S] additive (0 or -inf)
    cos2: torch.Tensor  # [B, T, R] (see _rope)
    sin2: torch.Tensor
    cos2_flat: torch.Tensor  # [B*T, R]
    sin2_flat: torch.Tensor
    flat_idx: torch.Tensor  # [B*T] row in buf.view(-1, C + R) of each new latent


class ModelRunner:
    def __init__(self, model: Transformer, cache: KVCache):
        self.model, self.cache = model, cache
        cfg = model.config
        self.H, self.C, self.R = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.nope, self.v = cfg.qk_nope_head_dim, cfg.v_head_dim
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-derive the absorbed weights; call after the model's weights change (e.g. RL)."""
        p = next(self.model.parameters())
        self._eps = {
            m.eps: torch.tensor(m.eps, dtype=p.dtype, device=p.device)
            for m in self.model.modules()
            if isinstance(m, RMSNorm)
        }
        blocks = list(self.model.layers) + [m.block for m in self.model.mtp]
        self.attn_w = [self._absorb(b) for b in blocks]

    def _absorb(self, block: Block) -> _AttnWeights:
        a = block.attn
        H, nope, v, C, R = self.H, self.nope, self.v, self.C, self.R
        # rope dims from interleaved (x0, x1, x2, ...) to [evens | odds]: what _rope expects
        perm = torch.cat([torch.arange(0, R, 2), torch.arange(1, R, 2)])
        kv_rows = torch.cat([torch.arange(C), C + perm])
        w_q = a.wq.weight if hasattr(a, "wq") else a.wq_b.weight  # [H*(nope+R), q_in]
        w_q = w_q.view(H, nope + R, -1) * a.scale
        q_nope, q_rope = w_q[:, :nope], w_q[:, nope + perm]
        w = a.wkv_b.weight.view(H, nope + v, C)
        w_uk, w_uv_t = w[:, :nope].contiguous(), w[:, nope:].transpose(1, 2).contiguous()
        q_in = w_q.shape[-1]
        if C * q_in <= nope * (q_in + C):  # folding W_uk into W_q reads no more bytes: fold
            q_nope, w_uk = w_uk.transpose(1, 2) @ q_nope, None  # [H, C, q_in]
        wq = torch.cat([q_nope, q_rope], dim=1).flatten(0, 1)
        if hasattr(a, "wq"):  # no q compression: queries come straight out of w_in
            w_in, wq = torch.cat([wq, a.wkv_a.weight[kv_rows]]), None
        else:
            w_in = torch.cat([a.wq_a.weight, a.wkv_a.weight[kv_rows]])
        k_dim = nope if w_uk is not None else C
        return _AttnWeights(w_in, wq, w_uk, w_uv_t, w_in.shape[0] - C - R, k_dim)

    def _rms(self, x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """RMSNorm in fewer dispatched ops than F.rms_norm (which is not fused on CPU)."""
        if x.dtype != torch.float32:  # the module's own float32 round trip
            return norm(x)
        ss = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # mean(x^2) = ss^2 / n
        return (
            x
            * torch.addcmul(self._eps[norm.eps], ss, ss, value=1.0 / x.shape[-1]).rsqrt_()
            * norm.weight
        )

    # --- one attention layer, absorbed --------------------------------------------------
    def _attention(self, block: Block, w: _AttnWeights, x, buf, st: _Step) -> torch.Tensor:
        """x [N = B*T, d] -> [N, d]; buf [B, max_len + 1, C + R] this layer's cache rows."""
        a = block.attn
        B, T = st.cos2.shape[:2]
        H, C, R, K = self.H, self.C, self.R, w.k_dim
        q, c_kv, k_rope = F.linear(x, w.w_in).split([w.q_dim, C, R], dim=-1)
        if w.wq is not None:
            q = F.linear(self._rms(q, a.q_norm), w.wq)
        q_k, q_rope = q.view(B, T, H, K + R).split([K, R], dim=-1)
        # write this chunk's latents into the cache, then attend over positions [0, S)
        latent = torch.cat(
            [self._rms(c_kv, a.kv_norm), _rope(k_rope, st.cos2_flat, st.sin2_flat)], -1
        )
        buf.view(-1, C + R).index_copy_(0, st.flat_idx, latent)
        if w.w_uk is not None:  # absorb W_uk here when it was not folded into wq
            q_k = (q_k.transpose(1, 2) @ w.w_uk).transpose(1, 2)
        q = torch.cat([q_k, _rope(q_rope, st.cos2[:, :, None], st.sin2[:, :, None])], dim=-1)
        q = q.transpose(1, 2).reshape(B, H * T, C + R)  # a view when T == 1
        kv = buf[:, : st.S]  # [B, S, C + R]: one latent "head" shared by all query heads
        scores = torch.baddbmm(st.mask, q, kv.transpose(1, 2))  # [B, H*T, S]
        if scores.dtype != torch.float32:
            scores = scores.float()
        o = scores.softmax(-1).to(kv.dtype) @ kv[..., :C]  # [B, H*T, C]
        o = o.view(B, H, T, C) @ w.w_uv_t  # [B, H, T, v]
        return F.linear(o.transpose(1, 2).reshape(B * T, H * self.v), a.wo.weight)

    def _mlp(self, mlp: MLP, x: torch.Tensor) -> torch.Tensor:
        return F.linear(
            F.silu(F.linear(x, mlp.w1.weight)) * F.linear(x, mlp.w3.weight), mlp.w2.weight
        )

    def _ffn(self, ffn, x: torch.Tensor) -> torch.Tensor:
        if isinstance(ffn, MLP):
            return self._mlp(ffn, x)
        assert isinstance(ffn, MoE)
        weights, idx, _ = ffn.gate(x)
        ex = ffn.experts
        if idx.numel() * (ex.w13[0].nbytes + ex.w2[0].nbytes) <= GATHER_EXPERTS_MAX_BYTES:
            # few tokens: each token's k experts as one batched matmul, no sync, no loop
            N, k = idx.shape
            sel = idx.view(-1)
            w13 = ex.w13.index_select(0, sel)  # [N*k, 2I, d]
            gu = torch.bmm(w13.view(N, -1, w13.shape[-1]), x[:, :, None])  # [N, k*2I, 1]
            g, u = gu.view(N * k, -1).chunk(2, dim=-1)
            y = torch.bmm(ex.w2.index_select(0, sel), (F.silu(g) * u)[:, :, None])
            out = torch.bmm(weights.to(y.dtype).view(N, 1, k), y.view(N, k, -1)).view(N, -1)
        else:
            out = ex(x, weights, idx)
        if ffn.shared is not None:
            out = out + self._mlp(ffn.shared, x)
        return out

    def _block(self, i: int, block: Block, x, start: int, st: _Step, mtp: bool = False):
        buf = self.cache.layer(i, start, st.cos2.shape[0], mtp=mtp)
        w = self.attn_w[len(self.model.layers) + i if mtp else i]
        x = x + self._attention(block, w, self._rms(x, block.attn_norm), buf, st)
        return x + self._ffn(block.ffn, self._rms(x, block.ffn_norm))

    # --- whole-model steps ---------------------------------------------------------------
    def _step(self, pos: torch.Tensor, S: int | None) -> _Step:
        B, T = pos.shape
        dt = self.cache.latent.dtype
        if S is None:
            S = int(pos.max()) + 1  # callers that know S pass it and skip this host read
        # key s is visible to the query at position p iff s <= p (also hides stale rows)
        hidden = torch.arange(S, device=pos.device) > pos[:, :, None]  # [B, T, S]
        mask = torch.zeros(B, T, S, dtype=dt, device=pos.device).masked_fill_(hidden, float("-inf"))
        cos, sin = self.model.rope(pos)  # [B, T, R/2]
        cos2, sin2 = torch.cat([cos, cos], -1).to(dt), torch.cat([-sin, sin], -1).to(dt)
        rows = torch.arange(B, device=pos.device)[:, None] * (self.cache.max_len + 1)
        return _Step(
            S,
            mask.repeat(1, self.H, 1),
            cos2,
            sin2,
            cos2.view(B * T, -1),
            sin2.view(B * T, -1),
            (rows + pos).view(-1),
        )

    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        start: int,
        S: int | None = None,
        plain: bool = False,
    ) -> torch.Tensor:
        """ids, pos [B, T] for cache rows start..start+B -> final-norm hidden [B, T, d].
        S (optional) = max(pos) + 1."""
        m = self.model
        if plain:
            S = int(pos.max()) + 1
            kv = [self.cache.layer_kv(i, start, ids.shape[0], S) for i in range(len(m.layers))]
            return m(ids, kv=kv, positions=pos, absorb=False).hidden
        st = self._step(pos, S)
        x = F.embedding(ids.view(-1), m.embed.weight)  # activations stay 2-D: [B*T, d]
        for i, block in enumerate(m.layers):
            x = self._block(i, block, x, start, st)
        return self._rms(x, m.norm).view(*ids.shape, -1)

    @torch.inference_mode()
    def mtp_forward(
        self,
        h: torch.Tensor,
        next_ids: torch.Tensor,
        pos: torch.Tensor,
        start: int,
        S: int | None = None,
        plain: bool = False,
    ) -> torch.Tensor:
        """MTP module 1 at positions pos [B, T]: reads the main model's final-norm hidden
        h [B, T, d] and the embedding of the token after each position; returns its normed
        output (the shared head turns it into logits for the token two ahead)."""
        mod = self.model.mtp[0]
        emb = self.model.embed(next_ids)
        if plain:
            S = int(pos.max()) + 1
            kv = self.cache.layer_kv(0, start, h.shape[0], S, mtp=True)
            cos, sin = self.model.rope(pos)
            return mod.norm(mod(h, emb, cos, sin, kv=kv, positions=pos, absorb=False))
        st = self._step(pos, S)
        emb, h = emb.view(-1, emb.shape[-1]), h.reshape(-1, h.shape[-1])
        x = F.linear(
            torch.cat([self._rms(emb, mod.enorm), self._rms(h, mod.hnorm)], -1), mod.eh_proj.weight
        )
        x = self._block(0, mod.block, x, start, st, mtp=True)
        return self._rms(x, mod.norm).view(*pos.shape, -1)

    @torch.inference_mode()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.model.head.weight)
