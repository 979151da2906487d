"""DeepSeekMoE: a gate, fine-grained routed experts, and always-on shared experts.

Gate (V3): s = sigmoid(x W_gate). Experts are *selected* by s + b, where b is a
per-expert bias moved by the trainer towards balanced load (auxiliary-loss-free
balancing); the *weights* use s alone, normalised over the chosen experts, times
route_scale. Group-limited routing: a group scores the sum of its top-2 (s + b) and each
token first picks `topk_group` groups. V2's softmax gate is supported for loading.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig

PAD = 64  # rows: expert slices are padded to a multiple of this (see Experts.forward)


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter, bias=False)
        self.w2 = nn.Linear(inter, dim, bias=False)
        self.w3 = nn.Linear(dim, inter, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.n_groups, self.topk_groups = cfg.n_group, cfg.topk_group
        self.route_scale = cfg.routed_scaling_factor
        self.norm_topk = cfg.norm_topk_prob
        self.scoring = cfg.scoring_func
        self.method = cfg.topk_method
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        # selection-only bias: a buffer, moved by the trainer, never by gradients
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts), persistent=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, d] -> (weights [N, k], expert indices [N, k], scores [N, E])."""
        with torch.autocast(x.device.type, enabled=False):  # routing decisions in fp32
            logits = F.linear(x.float(), self.weight.float())
        if self.scoring == "sigmoid":
            scores = logits.sigmoid()
            choice = scores + self.bias
        else:
            scores = logits.softmax(dim=-1)
            choice = scores
        if self.n_groups > 1 and self.method != "greedy":
            N, E = choice.shape
            grouped = choice.view(N, self.n_groups, E // self.n_groups)
            if self.scoring == "sigmoid":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:  # V2 group_limited_greedy: a group scores its best expert
                group_scores = grouped.amax(dim=-1)
            top_groups = group_scores.topk(self.topk_groups, dim=-1, sorted=False).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
            choice = choice.masked_fill(
                ~keep.repeat_interleave(E // self.n_groups, dim=1), float("-inf")
            )
        indices = choice.topk(self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, indices)
        if self.norm_topk:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, indices, scores


def _padded_index(token, counts, rows, total: int) -> torch.Tensor:
    """The token each padded row reads: expert e's tokens, then rows[e] - counts[e] rows of
    token 0, whose outputs are dropped (rows are independent)."""
    shift = (rows.cumsum(0) - rows) - (counts.cumsum(0) - counts)
    slot = torch.arange(len(token), device=token.device) + shift.repeat_interleave(
        counts, output_size=len(token)
    )
    return token.new_zeros(total).index_copy_(0, slot, token)


class Experts(nn.Module):
    """All routed experts' weights stacked: w13 = [gate; up] per expert, w2 = down."""

    def __init__(self, n_experts: int, dim: int, inter: int):
        super().__init__()
        self.inter = inter
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * inter, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter))

    # eager under torch.compile: the slice sizes change every step (one recompile each)
    @torch.compiler.disable
    def forward(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        indices: torch.Tensor,
        counts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [N, d]; each token goes to its k experts, `counts` [E] tokens per expert. Tokens
        are sorted by expert and every expert runs once on its contiguous slice (a loop over
        experts, never over tokens); its outputs are weighted and added into their tokens' rows."""
        N, k = indices.shape
        if counts is None:
            counts = torch.bincount(indices.flatten(), minlength=self.w13.shape[0])
        order = indices.flatten().argsort(stable=True)
        token = order // k  # the token of each sorted (token, choice) pair
        dt = (
            torch.get_autocast_dtype(x.device.type)
            if torch.is_autocast_enabled(x.device.type)
            else x.dtype
        )
        # In reduced precision each slice is padded to a multiple of PAD rows: oneDNN builds
        # a kernel for every new bf16 matmul shape, which costs more than the multiply when
        # shapes change every step. fp32 matmuls (MKL) have no such cost: no padding.
        pad = dt != torch.float32
        rows = (counts + PAD - 1) // PAD * PAD if pad else counts
        n_rows, n_used = torch.stack([rows, counts]).tolist()  # the layer's one host sync
        src = _padded_index(token, counts, rows, sum(n_rows)) if pad else token
        # cast once (not per expert under autocast), unbind once (indexing w13[e] would make
        # the backward build a full-size gradient per expert)
        w13, w2 = self.w13.to(dt).unbind(0), self.w2.to(dt).unbind(0)
        xs = x[src].to(dt)  # [sum(rows), d], grouped by expert
        # gate weights in the compute dtype: index_add_ takes one dtype
        w = weights.flatten()[order, None].to(dt)
        out = x.new_zeros(N, x.shape[1], dtype=dt)
        # split, not slicing: a slice's backward builds a zero gradient the size of the whole
        parts = zip(xs.split(n_rows), token.split(n_used), w.split(n_used), w13, w2, strict=True)
        for h, tok, w_e, w13_e, w2_e in parts:
            if len(tok) > 0:
                gate, up = F.linear(h, w13_e).chunk(2, dim=-1)
                y = F.linear(F.silu(gate) * up, w2_e)[: len(tok)]  # drop the padding rows
                out.index_add_(0, tok, y * w_e)
        return out.to(x.dtype)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared = (
            MLP(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size)
            if cfg.n_shared_experts > 0
            else None
        )
        self.balance_alpha = 0.0  # sequence-wise balance loss weight, set by the trainer
        self.tokens_per_expert: torch.Tensor | None = None  # from the last forward
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, indices, scores = self.gate(flat)
        counts = torch.bincount(indices.flatten(), minlength=self.n_experts)
        self.tokens_per_expert = counts
        if self.training and self.balance_alpha > 0:
            self.aux_loss = self.balance_alpha * self._sequence_balance_loss(scores, indices, shape)
        out = self.experts(flat, weights, indices, counts)
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view(shape)

    def _sequence_balance_loss(self, scores, indices, shape) -> torch.Tensor:
        """DeepSeek-V3's sequence-wise loss: sum_i f_i P_i per sequence, averaged over the batch."""
        B, T = shape[0], shape[1]
        E, k = self.n_experts, self.top_k
        chosen = torch.zeros(B * T, E, device=scores.device).scatter_(1, indices, 1.0)
        f = chosen.view(B, T, E).sum(1) * E / (k * T)
        p = (scores / scores.sum(-1, keepdim=True)).view(B, T, E).mean(1)
        return (f * p).sum(-1).mean()
