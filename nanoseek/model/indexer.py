"""DeepSeek-V3.2's lightning indexer (DeepSeek Sparse Attention, DSA).

A few small heads score every query against every earlier token,

    I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s] / sqrt(index_head_dim)),   w = weights_proj(x) / sqrt(n_heads)

with queries from the compressed query MLA already computes (`q_norm(wq_a(x))` -> wq_b),
one key per token (`x -> wk -> LayerNorm`), and RoPE on the first `qk_rope_head_dim`
numbers of each, rotating halves (not interleaved pairs as MLA does). Each query then
attends only over its `index_topk` best-scoring earlier tokens; with at most `index_topk`
visible tokens that is every token, and attention is MLA's dense causal attention.
The selection carries no gradient: the indexer learns from `indexer_kl`, the V3.2 report's
KL from the main attention's distribution (heads summed) to the indexer's: alone in a
dense warm-up (the rest frozen), then beside the language-model loss in sparse training.

`transformers`' DeepseekV32Indexer is the reference (its parameter names are ours); the
release's Hadamard rotation and FP8 scoring are precision tricks that leave the scores
unchanged, and are left out as they are there.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig


def apply_rope_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on pairs (x_i, x_{i + d/2}) (transformers' rotate_half form) of the first 2 *
    cos.shape[-1] numbers of x [B, T, (H,) d]; the rest pass through."""
    r = 2 * cos.shape[-1]
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x1, x2, rest = x[..., : r // 2].float(), x[..., r // 2 : r].float(), x[..., r:]
    rot = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([rot, rest], dim=-1)


class Indexer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = (
            cfg.index_n_heads,
            cfg.index_head_dim,
            cfg.index_topk,
        )
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)
        self.scale = self.head_dim**-0.5
        self.enabled = True  # False: attention stays dense (the warm-up; see dense_attention)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] (the attention input) -> one key per token [B, T, head_dim]."""
        return apply_rope_halves(self.k_norm(self.wk(x)), cos, sin)

    def scores(
        self,
        x: torch.Tensor,
        q_lat: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        keys: torch.Tensor,
    ) -> torch.Tensor:
        """Index scores [B, T, S] in float32 of the queries of x [B, T, d] (q_lat [B, T,
        q_lora_rank]: q_norm(wq_a(x))) against keys [B, S, head_dim]; unmasked."""
        B, T, _ = x.shape
        q = self.wq_b(q_lat).view(B, T, self.n_heads, self.head_dim)
        q = apply_rope_halves(q, cos, sin)
        s = torch.matmul(q.float(), keys.transpose(-1, -2).float().unsqueeze(1))  # [B, T, H, S]
        s = F.relu(s * self.scale)
        w = self.weights_proj(x.to(self.weights_proj.weight.dtype)).float() * self.n_heads**-0.5
        return torch.matmul(w.unsqueeze(-2), s).squeeze(-2)  # sum_h w_h * s_h

    def select(self, scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """The attention mask [B, T, S] (True: attend): each query's index_topk best-scoring
        visible keys. visible [B or 1, T, S] bool (causal, and the cache's length)."""
        scores = scores.masked_fill(~visible, float("-inf"))
        top = scores.topk(min(self.topk, scores.shape[-1]), dim=-1).indices
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
        return keep & visible  # a query with fewer than topk visible keys keeps them all


@contextmanager
def dense_attention(model: nn.Module):
    """Within: every indexer is off, so attention is dense (the warm-up's forward)."""
    indexers = [m for m in model.modules() if isinstance(m, Indexer)]
    before = [m.enabled for m in indexers]
    for m in indexers:
        m.enabled = False
    try:
        yield
    finally:
        for m, on in zip(indexers, before, strict=True):
            m.enabled = on


def indexer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the warm-up trains (every indexer's; the main model's stay frozen)."""
    return [p for m in model.modules() if isinstance(m, Indexer) for p in m.parameters()]


def kl_to_scores(p: torch.Tensor, scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """KL(p || softmax(scores over keep)) per query (the last dimension is the keys), the
    indexers' loss in V3.2 and V4. In fp32: under bf16 autocast a bf16 log-softmax against
    an fp32 p made the KL negative. A row with nothing kept gives 0, not NaN (finite fill)."""
    scores = scores.float()
    logq = scores.masked_fill(~keep, torch.finfo(scores.dtype).min).log_softmax(-1)
    logq = logq.masked_fill(~keep, 0.0)  # p is 0 there: no term
    return (torch.xlogy(p, p) - p * logq).sum(-1)


def indexer_kl(model: nn.Module, input_ids: torch.Tensor, sparse: bool = False) -> torch.Tensor:
    """The V3.2 report's indexer loss: over the main layers, the mean per query of
    KL(p || softmax(I)), p the main attention's distribution (summed over heads,
    L1-normalised, detached), I the indexer's scores. The indexers' inputs are detached, so
    gradients reach only them.

    sparse=False, the dense warm-up: the forward is dense and p, I cover every causal key.
    Freeze the rest: `opt = AdamW(indexer_parameters(model))`, then per batch
    `indexer_kl(model, ids).backward(); opt.step(); opt.zero_grad()`.
    sparse=True, the sparse stage: the forward is sparse and p, I cover each query's
    selected keys only; add this loss to the language-model loss (it reaches only the
    indexers, the LM loss never does)."""
    B, T = input_ids.shape
    positions = torch.arange(T, device=input_ids.device).expand(B, T)
    cos, sin = model.rope(positions)
    causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()[None]
    losses = []
    with nullcontext() if sparse else dense_attention(model):
        with torch.no_grad():
            h = model.embed(input_ids)
        for layer in model.layers:
            attn, idx = layer.attn, layer.attn.indexer
            with torch.no_grad():
                x = layer.attn_norm(h)
                q_lat = attn.q_norm(attn.wq_a(x))
            scores = idx.scores(x, q_lat, cos, sin, idx.keys(x, cos, sin))  # [B, T, T]
            keep = causal
            if sparse and T > idx.topk:
                keep = idx.select(scores.detach(), causal)
            p = attn.attention_probs(x, cos, sin, keep)
            losses.append(kl_to_scores(p, scores, keep).mean())
            with torch.no_grad():
                h = layer(h, cos, sin)
    return torch.stack(losses).mean()
