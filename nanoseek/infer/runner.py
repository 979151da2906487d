"""ModelRunner: runs the model over the latent cache, for prefill, decode and verify steps.

Two paths over the same cache and weights:
- `absorbed` (default): a lean forward written for inference. W_kvb's key half is folded
  into the query (q_lat = q_nope W_uk, per head) and its value half into the output
  (o = o_lat W_uv), so attention is multi-query attention over the cached latents
  `[c_kv | k_rope]` and full keys/values never exist. Weights are rearranged once here.
- `plain`: the model's own forward (`Transformer.forward(kv=...)`), which
  re-expands keys and values from the latents: the reference the fast path is tested against.

At small sizes a decode step is all dispatch overhead, so the fast path counts ops:
- every RMSNorm weight that feeds a matmul is folded into that matmul's columns (attn_norm
  into the input projection, q_norm into W_qb, ffn_norm into the FFN, enorm/hnorm into
  eh_proj); the softmax scale into W_qb; W_uk into W_qb and W_uv into W_o when that reads
  no more bytes;
- one input projection yields q (or q_a) and the latents, with a rotate-half copy of each
  rope slice so RoPE is two ops;
- cos/sin come from a table, and the mask, the cache views and the write indices are built
  once per step and shared by every layer (and by the MTP module in a verify step);
- MoE: with small experts, the gate, every routed expert and the shared expert are one
  dense matmul in and one out (unchosen experts weigh 0); with large experts on CPU,
  tokens sorted by expert go through `grouped_mm`, which reads each chosen expert's
  weights in place: no copies, no host sync, no Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanoseek.infer.cache import KVCache
from nanoseek.model.moe import MLP, MoE
from nanoseek.model.transformer import Block, Transformer

DENSE_EXPERTS_MAX_BYTES = 1 << 20  # all experts this small: run them all, it's fewer ops
GATHER_EXPERTS_MAX_BYTES = 8 << 20  # (non-CPU) above this, copying expert weights costs more


def _rms(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """RMSNorm without its weight (folded into the next matmul) in four ops, fewer than
    F.rms_norm's on CPU; eps is a 0-dim fp32 tensor made once. Non-fp32 inputs get the
    module's float32 round trip."""
    if x.dtype != torch.float32:  # no eps.item(): that would sync with the GPU every call
        return (x.float() * _rms_scale(x, eps)).to(x.dtype)
    return x * _rms_scale(x, eps)


def _rms_scale(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """1 / rms(x) [..., 1] (fp32)."""
    ss = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
    return torch.addcmul(eps, ss, ss, value=1.0 / x.shape[-1]).rsqrt_()  # mean(x^2) = ss^2/n


def _rope(x: torch.Tensor, x_swapped: torch.Tensor, cos2, sin2) -> torch.Tensor:
    """RoPE on rope dims in [evens | odds] order, given also x_swapped = [odds | evens]
    (both come out of the projection): with cos2 = [cos | cos] and sin2 = [-sin | sin] this
    is apply_rope's [x1 cos - x2 sin | x2 cos + x1 sin]."""
    return torch.addcmul(x * cos2, x_swapped, sin2)


def _t(w: torch.Tensor) -> torch.Tensor:
    """Weight [out, in] -> [in, out] view: `x @ w` skips F.linear's per-call transpose."""
    return w.t()


@dataclass
class _Attn:
    w_in: torch.Tensor  # [d, Q + 2C + 2R]: q_a (or q) | c_kv | c_kv g | k_rope | k_rope swapped
    wq: torch.Tensor | None  # [q_rank, H*(K + 2R)]: per head q_k | q_rope | q_rope swapped
    w_uk: torch.Tensor | None  # [H, nope, C]: W_kvb's key half, when not folded into wq
    w_uv_t: torch.Tensor | None  # [H, C, v]: W_kvb's value half, when not folded into wo
    wo: torch.Tensor  # [H*C, d] (W_uv folded in) or [H*v, d]
    q_eps: torch.Tensor | None  # 0-dim fp32
    kv_eps: torch.Tensor
    q_dim: int  # Q
    k_dim: int  # K: the query's non-rope width per head, C when W_uk is folded, else nope


@dataclass
class _FFN:
    """A dense MLP (w13 = [w1 | w3]) or an MoE; ffn_norm folded in where weights are copies."""

    w13: torch.Tensor  # [d, ...]: MLP [w1|w3]; dense MoE [gate? | every expert's w1|w3]
    w2: torch.Tensor  # [..., d]
    moe: MoE | None = None
    dense: bool = False  # MoE run as one dense matmul over all experts (+ shared)
    fused_gate: bool = False  # the gate's logits are w13's first E columns
    gate: torch.Tensor | None = None  # [d, E] fp32
    norm: torch.Tensor | None = None  # ffn_norm weight, when not folded (grouped MoE)
    n_shared: int = 0  # dense MoE: shared experts, as experts E..E+n_shared-1


@dataclass
class _Layer:
    attn: _Attn
    ffn: _FFN
    eps: torch.Tensor  # attn_norm / ffn_norm eps, 0-dim fp32


@dataclass
class _Step:
    """Everything a layer needs that depends only on the step, built once per step."""

    B: int
    T: int
    S: int  # attend over cache positions [0, S)
    mask: torch.Tensor | None  # [B, H*T or 1, S] additive (0 or -inf); None: all visible
    cos_q: torch.Tensor  # [B, T, 1, R] (see _rope)
    sin_q: torch.Tensor
    cos_k: torch.Tensor  # [B*T, R]
    sin_k: torch.Tensor
    rows: torch.Tensor  # [B*T] row of each new latent in a layer's flat [slots*P, C+R] cache


class ModelRunner:
    def __init__(self, model: Transformer, cache: KVCache):
        self.model, self.cache = model, cache
        cfg = model.config
        self.H, self.C, self.R = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.nope, self.v = cfg.qk_nope_head_dim, cfg.v_head_dim
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-derive the folded weights; call after the model's weights change (e.g. RL)."""
        m, cache = self.model, self.cache
        p = next(m.parameters())
        self.layers = [self._prepare(b) for b in m.layers]
        self.mtp_layers = [self._prepare(mod.block) for mod in m.mtp]
        if m.mtp:  # enorm | hnorm folded into eh_proj's two column halves
            mod = m.mtp[0]
            self.eh = _t(mod.eh_proj.weight * torch.cat([mod.enorm.weight, mod.hnorm.weight]))
        self.head = _t(m.head.weight)
        self.norm_eps = self._eps(m.norm.eps)
        if m.mtp:
            self.mtp_eps = (self._eps(m.mtp[0].enorm.eps), self._eps(m.mtp[0].norm.eps))
        # RoPE table over every cache position: [P, 2, 1, R] = (cos2, sin2) per position
        P = cache.max_len + 1
        cos, sin = m.rope(torch.arange(P, device=p.device))
        cs = torch.stack([torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)], 1)
        self.rope_table = cs[:, :, None].to(p.dtype)
        self.arange = torch.arange(P, device=p.device)
        self.row_base = torch.arange(cache.slots, device=p.device) * P
        self.neg_inf = torch.tensor(float("-inf"), dtype=p.dtype, device=p.device)
        self.zero = torch.tensor(0.0, dtype=p.dtype, device=p.device)
        self.flat = [cache.latent[i].view(-1, self.C + self.R) for i in range(len(m.layers))]
        if cache.mtp_latent is not None:
            self.mtp_flat = [buf.view(-1, self.C + self.R) for buf in cache.mtp_latent]

    # --- weight preparation (once) -------------------------------------------------------
    def _prepare(self, block: Block) -> _Layer:
        return _Layer(self._absorb(block), self._ffn(block), self._eps(block.attn_norm.eps))

    def _eps(self, eps: float) -> torch.Tensor:
        return torch.tensor(eps, dtype=torch.float32, device=self.model.embed.weight.device)

    def _absorb(self, block: Block) -> _Attn:
        a = block.attn
        H, nope, v, C, R = self.H, self.nope, self.v, self.C, self.R
        # rope dims from interleaved (x0, x1, x2, ...) to [evens | odds], and the swapped copy
        perm = torch.cat([torch.arange(0, R, 2), torch.arange(1, R, 2)])
        swap = torch.cat([perm[R // 2 :], perm[: R // 2]])
        w_q = a.wq.weight if hasattr(a, "wq") else a.wq_b.weight  # [H*(nope+R), q_in]
        w_q = w_q.view(H, nope + R, -1) * a.scale
        q_nope, q_rope, q_swap = w_q[:, :nope], w_q[:, nope + perm], w_q[:, nope + swap]
        w = a.wkv_b.weight.view(H, nope + v, C)
        w_uk, w_uv_t = w[:, :nope].contiguous(), w[:, nope:].transpose(1, 2).contiguous()
        q_in, d = w_q.shape[-1], a.wo.weight.shape[0]
        if C * q_in <= nope * (q_in + C):  # folding W_uk into W_q reads no more bytes: fold
            q_nope, w_uk = w_uk.transpose(1, 2) @ q_nope, None  # [H, C, q_in]
        wq = torch.cat([q_nope, q_rope, q_swap], dim=1).flatten(0, 1)
        kv = a.wkv_a.weight
        if hasattr(a, "wq"):  # no q compression: queries come straight out of w_in
            q_a, wq, q_eps = wq, None, None
        else:
            q_a = a.wq_a.weight
            wq, q_eps = _t(wq * a.q_norm.weight), self._eps(a.q_norm.eps)
        wo = a.wo.weight.view(d, H, v)
        if C * d <= v * (C + d):  # likewise W_uv into W_o: [H*C, d]
            wo, w_uv_t = torch.einsum("hcv,dhv->hcd", w_uv_t, wo).flatten(0, 1), None
        else:
            wo = _t(a.wo.weight)
        # c_kv twice: as is (for kv_norm's rms) and times kv_norm's weight (what is cached)
        w_in = torch.cat(
            [q_a, kv[:C], kv[:C] * a.kv_norm.weight[:, None], kv[C + perm], kv[C + swap]]
        )
        w_in = _t(w_in * block.attn_norm.weight)
        k_dim = nope if w_uk is not None else C
        kv_eps = self._eps(a.kv_norm.eps)
        return _Attn(w_in, wq, w_uk, w_uv_t, wo, q_eps, kv_eps, q_a.shape[0], k_dim)

    def _ffn(self, block: Block) -> _FFN:
        ffn, g = block.ffn, block.ffn_norm.weight
        if isinstance(ffn, MLP):
            return _FFN(_t(torch.cat([ffn.w1.weight, ffn.w3.weight]) * g), _t(ffn.w2.weight))
        assert isinstance(ffn, MoE)
        ex, sh = ffn.experts, ffn.shared
        E, I, d = ex.w13.shape[0], ex.inter, ex.w13.shape[2]
        gate = ffn.gate.weight.float()
        if ex.w13.nbytes + ex.w2.nbytes <= DENSE_EXPERTS_MAX_BYTES:
            # every expert as one wide matmul; the shared expert as n_shared more experts
            # route_scale folded into the routed experts' down projection
            w13 = [ex.w13]
            w2 = [ex.w2.permute(0, 2, 1).reshape(E * I, d) * ffn.gate.route_scale]
            if sh is not None:
                w13.append(torch.cat([sh.w1.weight.view(-1, I, d), sh.w3.weight.view(-1, I, d)], 1))
                w2.append(sh.w2.weight.t())
            w13 = torch.cat(w13).flatten(0, 1) * g  # [(E + ns) * 2I, d]
            fused = w13.dtype == torch.float32  # the gate runs in fp32: fuse only then
            if fused:
                w13 = torch.cat([gate * g, w13])
            n_shared = sh.w1.weight.shape[0] // I if sh is not None else 0
            return _FFN(_t(w13), torch.cat(w2), ffn, True, fused, _t(gate * g), n_shared=n_shared)
        w13 = torch.cat([sh.w1.weight, sh.w3.weight]) if sh is not None else None
        w2 = sh.w2.weight if sh is not None else None
        return _FFN(
            None if w13 is None else _t(w13),
            None if w2 is None else _t(w2),
            ffn,
            gate=_t(gate),
            norm=g,
        )

    # --- one layer, absorbed -------------------------------------------------------------
    def _attention(self, w: _Attn, x, flat, kv, st: _Step) -> torch.Tensor:
        """x [N = B*T, d] normed (weight folded) -> [N, d]. flat: this layer's cache as
        rows [slots*P, C + R]; kv [B, S, C + R]: the rows attention reads."""
        B, T, H, C, R, K = st.B, st.T, self.H, self.C, self.R, w.k_dim
        q, c_kv, c_g, k_rope, k_swap = (x @ w.w_in).split_with_sizes([w.q_dim, C, C, R, R], -1)
        if w.wq is not None:
            q = _rms(q, w.q_eps) @ w.wq
        q_k, q_rope, q_swap = q.view(B, T, H, K + 2 * R).split_with_sizes([K, R, R], -1)
        # write this chunk's latents into the cache, then attend over positions [0, S)
        c_kv = c_g * _rms_scale(c_kv, w.kv_eps)  # kv_norm(c_kv), its weight folded into c_g
        flat.index_copy_(
            0, st.rows, torch.cat([c_kv, _rope(k_rope, k_swap, st.cos_k, st.sin_k)], -1)
        )
        if w.w_uk is not None:  # absorb W_uk here when it was not folded into wq
            q_k = (q_k.transpose(1, 2) @ w.w_uk).transpose(1, 2)
        q = torch.cat([q_k, _rope(q_rope, q_swap, st.cos_q, st.sin_q)], dim=-1)
        q = q.transpose(1, 2).reshape(B, H * T, C + R)  # a view when T == 1
        kt = kv.transpose(1, 2)  # one latent "head" shared by all query heads
        scores = torch.bmm(q, kt) if st.mask is None else torch.baddbmm(st.mask, q, kt)
        probs = scores.softmax(-1, dtype=torch.float32)
        if probs.dtype != kv.dtype:
            probs = probs.to(kv.dtype)
        o = probs @ kv[..., :C]  # [B, H*T, C]
        o = o.view(B, H, T, C)
        if w.w_uv_t is not None:
            o = o @ w.w_uv_t  # [B, H, T, v]
        return o.transpose(1, 2).reshape(B * T, -1) @ w.wo

    def _ffn_forward(self, f: _FFN, x: torch.Tensor) -> torch.Tensor:
        """x [N, d] normed; ffn_norm's weight is in f's matrices unless f.norm is set."""
        if f.moe is None:
            g, u = (x @ f.w13).chunk(2, dim=-1)
            return (F.silu(g) * u) @ f.w2
        if f.dense:
            return self._dense_moe(f, x)
        x = x * f.norm
        weights, idx = self._route(f.moe, x.float() @ f.gate)
        out = self._grouped_experts(f.moe, x, weights, idx)
        if f.w13 is not None:
            g, u = (x @ f.w13).chunk(2, dim=-1)
            out = out + (F.silu(g) * u) @ f.w2
        return out

    def _route(self, moe: MoE, logits: torch.Tensor, scale: bool = True):
        """The gate (nanoseek.model.moe.Gate) from its logits, in fewer ops: groups are
        masked by adding -inf through a broadcast, not a repeat_interleave'd bool mask."""
        gate = moe.gate
        if gate.scoring == "sigmoid":
            scores = logits.sigmoid()
            choice = scores + gate.bias
        else:
            scores = choice = logits.softmax(dim=-1)
        if gate.n_groups > 1 and gate.method != "greedy":
            N, E = choice.shape
            grouped = choice.view(N, gate.n_groups, -1)
            if gate.scoring == "sigmoid":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            top = group_scores.topk(gate.topk_groups, dim=-1, sorted=False).indices
            drop = torch.full_like(group_scores, float("-inf")).scatter_(1, top, 0.0)
            choice = (grouped + drop[:, :, None]).view(N, E)
        idx = choice.topk(gate.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, idx)
        if gate.norm_topk:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if scale and gate.route_scale != 1.0:
            weights = weights * gate.route_scale
        return weights, idx

    def _dense_moe(self, f: _FFN, x: torch.Tensor) -> torch.Tensor:
        moe = f.moe
        E, I = moe.n_experts, moe.experts.inter
        if f.fused_gate:
            logits, h = (x @ f.w13).split([E, f.w13.shape[1] - E], dim=-1)
        else:
            logits, h = x.float() @ f.gate, x @ f.w13
        weights, idx = self._route(moe, logits, scale=False)
        N = x.shape[0]
        # per-expert weights: 0 for experts not chosen, 1 for the shared ones
        dense = F.pad(logits.new_zeros(N, E).scatter_(1, idx, weights), (0, f.n_shared), value=1.0)
        if dense.dtype != x.dtype:
            dense = dense.to(x.dtype)
        g, u = h.view(N, -1, 2, I).unbind(2)
        return (F.silu(g) * u * dense[:, :, None]).view(N, -1) @ f.w2

    def _grouped_experts(self, moe: MoE, x, weights, idx) -> torch.Tensor:
        ex = moe.experts
        N, k = idx.shape
        # grouped_mm wants bf16 on CUDA and is missing before torch 2.8: gather or sort instead
        if x.device.type != "cpu" or not hasattr(F, "grouped_mm"):
            return self._gathered_experts(ex, x, weights, idx)
        sorted_e, order = idx.view(-1).sort()
        offs = torch.searchsorted(
            sorted_e, self.arange[: ex.w13.shape[0]], right=True, out_int32=True
        )
        h = F.grouped_mm(x[order // k], ex.w13.transpose(1, 2), offs=offs)  # [N*k, 2I]
        g, u = h.chunk(2, dim=-1)
        y = F.grouped_mm(F.silu(g) * u, ex.w2.transpose(1, 2), offs=offs)  # [N*k, d]
        y = torch.empty_like(y).index_copy_(0, order, y)  # back to token-major order
        return torch.bmm(weights.to(y.dtype).view(N, 1, k), y.view(N, k, -1)).view(N, -1)

    def _gathered_experts(self, ex, x, weights, idx) -> torch.Tensor:
        if idx.numel() * (ex.w13[0].nbytes + ex.w2[0].nbytes) > GATHER_EXPERTS_MAX_BYTES:
            return ex(x, weights, idx)
        N, k = idx.shape  # few tokens: each token's k experts as one batched matmul, no sync
        sel = idx.view(-1)
        w13 = ex.w13.index_select(0, sel)  # [N*k, 2I, d]
        gu = torch.bmm(w13.view(N, -1, w13.shape[-1]), x[:, :, None])  # [N, k*2I, 1]
        g, u = gu.view(N * k, -1).chunk(2, dim=-1)
        y = torch.bmm(ex.w2.index_select(0, sel), (F.silu(g) * u)[:, :, None])
        return torch.bmm(weights.to(y.dtype).view(N, 1, k), y.view(N, k, -1)).view(N, -1)

    def _layer(self, w: _Layer, x, flat, kv, st: _Step) -> torch.Tensor:
        x = x + self._attention(w.attn, _rms(x, w.eps), flat, kv, st)
        return x + self._ffn_forward(w.ffn, _rms(x, w.eps))

    # --- whole-model steps ---------------------------------------------------------------
    def prepare(self, pos: torch.Tensor, start: int = 0, S: int | None = None) -> _Step:
        """The per-step inputs every layer shares, for pos [B, T] in cache rows
        start..start+B; S = max(pos) + 1 (pass it when known, to skip a host read).
        A verify step builds it once for the model and the MTP module."""
        B, T = pos.shape
        if S is None:
            S = int(pos.max()) + 1
        mask = None
        if B > 1 or T > 1:  # one query at S - 1 sees every key: no mask needed
            # key s is visible to the query at position p iff s <= p (also hides stale rows)
            mask = torch.where(self.arange[:S] > pos[:, :, None], self.neg_inf, self.zero)
            if T > 1:
                mask = mask[:, None].expand(B, self.H, T, S).reshape(B, self.H * T, S)
        cs = self.rope_table[pos]  # [B, T, 2, 1, R]
        ck = cs.view(B * T, 2, self.R)
        rows = (self.row_base[start : start + B, None] + pos).view(-1)
        return _Step(B, T, S, mask, cs[:, :, 0], cs[:, :, 1], ck[:, 0], ck[:, 1], rows)

    def _run(self, layers, flats, latent, x, start: int, st: _Step) -> torch.Tensor:
        kvs = latent[:, start : start + st.B, : st.S]  # this batch's rows of every layer
        for i, w in enumerate(layers):
            x = self._layer(w, x, flats[i], kvs[i], st)
        return x

    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        start: int,
        S: int | None = None,
        plain: bool = False,
        step: _Step | None = None,
    ) -> torch.Tensor:
        """ids, pos [B, T] for cache rows start..start+B -> final-norm hidden [B, T, d].
        S (optional) = max(pos) + 1; step (optional): prepare(pos, start, S), built by the caller."""
        m = self.model
        if plain:
            S = int(pos.max()) + 1
            kv = [self.cache.layer_kv(i, start, ids.shape[0], S) for i in range(len(m.layers))]
            return m(ids, kv=kv, positions=pos).hidden
        st = step or self.prepare(pos, start, S)
        x = F.embedding(ids.view(-1), m.embed.weight)  # activations stay 2-D: [B*T, d]
        x = self._run(self.layers, self.flat, self.cache.latent, x, start, st)
        return (_rms(x, self.norm_eps) * m.norm.weight).view(*ids.shape, -1)

    @torch.inference_mode()
    def mtp_forward(
        self,
        h: torch.Tensor,
        next_ids: torch.Tensor,
        pos: torch.Tensor,
        start: int,
        S: int | None = None,
        plain: bool = False,
        step: _Step | None = None,
    ) -> torch.Tensor:
        """MTP module 1 at positions pos [B, T]: reads the main model's final-norm hidden
        h [B, T, d] and the embedding of the token after each position; returns its normed
        output (the shared head turns it into logits for the token two ahead)."""
        mod = self.model.mtp[0]
        if plain:
            emb = self.model.embed(next_ids)
            S = int(pos.max()) + 1
            kv = self.cache.layer_kv(0, start, h.shape[0], S, mtp=True)
            cos, sin = self.model.rope(pos)
            return mod.norm(mod(h, emb, cos, sin, kv=kv, positions=pos))
        st = step or self.prepare(pos, start, S)
        d = h.shape[-1]
        emb = F.embedding(next_ids.view(-1), self.model.embed.weight)
        # enorm and hnorm share an eps: normalise [emb, h] as one [N, 2, d] tensor
        both = torch.stack([emb, h.reshape(-1, d)], 1)
        x = _rms(both, self.mtp_eps[0]).view(-1, 2 * d) @ self.eh
        x = self._run(self.mtp_layers, self.mtp_flat, self.cache.mtp_latent, x, start, st)
        return (_rms(x, self.mtp_eps[1]) * mod.norm.weight).view(*pos.shape, -1)

    @torch.inference_mode()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.head
