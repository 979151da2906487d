"""Manifold-constrained hyper-connections (mHC), DeepSeek-V4's residual stream.

V4 replaces the single residual stream with `hc_mult` (N = 4) parallel streams,
[B, S, N, D]. Around each sub-block (attention, then the MoE) a `HyperConnection`
computes, from the N streams themselves (flattened, RMS-normalised without a weight,
one linear layer `fn` plus a bias `base`, each part times its own `scale`):

- `pre` [B, S, N]:  sigmoid(.) + eps, the weights that collapse the N streams into the
  block's one input, `x_in = sum_n pre_n * h_n`;
- `post` [B, S, N]: 2 * sigmoid(.), how much of the block's output each stream receives;
- `comb` [B, S, N, N]: how the streams are carried past the block. It is projected onto
  the doubly-stochastic matrices (rows and columns sum to 1) by Sinkhorn-Knopp, so the
  residual mix is a convex combination of streams: its norm cannot grow with depth, which
  is the "manifold constraint" that keeps deep stacks of mixed streams stable.

The streams after the block are `h'_k = post_k * out + sum_j comb[j, k] * h_j` (`update`).
At the top of the model `HyperHead` collapses the streams once more (sigmoid weights, no
Sinkhorn) before the final norm. Parameter names are transformers' DeepseekV4
(`layers.i.attn_hc.{fn,base,scale}`, `layers.i.ffn_hc...`, `hc_head.{hc_fn,hc_base,
hc_scale}`); like the reference these modules compute in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without a weight (transformers' DeepseekV4UnweightedRMSNorm)."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def sinkhorn(logits: torch.Tensor, iters: int = 20, eps: float = 1e-6) -> torch.Tensor:
    """[..., N, N] logits -> a doubly-stochastic matrix (rows and columns sum to 1).

    Exactly DeepSeek-V4's order: softmax over the last axis (+ eps, so every entry is
    positive), normalise the columns, then `iters - 1` rounds of rows and columns. Each
    normalisation divides by (sum + eps). The columns are normalised last, so they sum to
    1 up to eps; the rows converge to 1 geometrically.
    """
    m = torch.softmax(logits, dim=-1) + eps
    m = m / (m.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
    return m


class HyperConnection(nn.Module):
    """The mHC around one sub-block (transformers' DeepseekV4HyperConnection).

    `forward(h)` -> (post [B,S,N], comb [B,S,N,N] fp32, collapsed block input [B,S,D]);
    after the block runs, `update(h, out, post, comb)` gives the new streams.
    """

    def __init__(
        self,
        hidden_size: int,
        hc_mult: int = 4,
        sinkhorn_iters: int = 20,
        hc_eps: float = 1e-6,
        norm_eps: float = 1e-6,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.hc_mult, self.sinkhorn_iters = hc_mult, sinkhorn_iters
        self.hc_eps, self.norm_eps = hc_eps, norm_eps
        n = hc_mult
        # one projection for all three: pre (N) | post (N) | comb (N x N)
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * hidden_size))
        self.base = nn.Parameter(torch.zeros((2 + n) * n))
        self.scale = nn.Parameter(torch.ones(3))  # pre, post, comb
        nn.init.normal_(self.fn, std=init_std)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, S, n = h.shape[0], h.shape[1], self.hc_mult
        mixes = F.linear(rms_normalize(h.reshape(B, S, -1).float(), self.norm_eps), self.fn.float())
        pre_w, post_w, comb_w = mixes.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.split([n, n, n * n])
        pre_s, post_s, comb_s = self.scale.unbind(0)
        pre = torch.sigmoid(pre_w * pre_s + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * post_s + post_b)
        comb_logits = comb_w.view(B, S, n, n) * comb_s + comb_b.view(n, n)
        comb = sinkhorn(comb_logits, self.sinkhorn_iters, self.hc_eps)
        collapsed = (pre.unsqueeze(-1) * h).sum(dim=2).to(h.dtype)
        return post, comb, collapsed

    @staticmethod
    def update(
        h: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor
    ) -> torch.Tensor:
        """New streams: h'_k = post_k * out + sum_j comb[j, k] * h_j (comb is applied
        transposed: it is doubly stochastic but not symmetric, so the direction matters)."""
        dtype = h.dtype
        return (
            post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + comb.to(dtype).transpose(-1, -2) @ h
        )


class HyperHead(nn.Module):
    """Collapses the N streams into one hidden state before the final norm
    (transformers' DeepseekV4HyperHead): weights sigmoid(.) + eps, no Sinkhorn."""

    def __init__(
        self,
        hidden_size: int,
        hc_mult: int = 4,
        hc_eps: float = 1e-6,
        norm_eps: float = 1e-6,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.hc_eps, self.norm_eps = hc_eps, norm_eps
        self.hc_fn = nn.Parameter(torch.empty(hc_mult, hc_mult * hidden_size))
        self.hc_base = nn.Parameter(torch.zeros(hc_mult))
        self.hc_scale = nn.Parameter(torch.ones(1))
        nn.init.normal_(self.hc_fn, std=init_std)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        mixes = F.linear(rms_normalize(h.flatten(2).float(), self.norm_eps), self.hc_fn.float())
        pre = torch.sigmoid(mixes * self.hc_scale.float() + self.hc_base.float()) + self.hc_eps
        return (pre.unsqueeze(-1) * h).sum(dim=2).to(h.dtype)
