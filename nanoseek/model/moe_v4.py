"""DeepSeek-V4's MoE: what changes from V3's DeepSeekMoE (moe.py), piece by piece.

- **Scoring: `sqrtsoftplus`.** Expert scores are sqrt(softplus(x W_gate)) instead of V3's
  sigmoid: positive, smooth, and unbounded above (growing like sqrt(x)) where a sigmoid
  saturates at 1. As in V3, experts are *selected* by score + `e_score_correction_bias`
  (the auxiliary-loss-free balancing bias, moved by the trainer) and *weighted* by the
  scores alone, normalised over the chosen experts, times `routed_scaling_factor`. No
  group-limited routing.
- **Hash routing** in the first layers (`mlp_layer_types == "hash_moe"`, 3 in the
  released models): which experts a token goes to is a fixed table `tid2eid[token_id]` of
  k experts per vocabulary entry, shipped in the checkpoint, not learned; the gate still
  scores the experts to weight them.
- **SwiGLU clamp.** Every expert, the shared one too, clamps its pre-activations: the
  gate branch from above at `swiglu_limit` (10), the up branch to [-limit, limit], which
  bounds the activations fed to the down projection.

Parameter names are transformers' DeepseekV4 (`mlp.gate.weight`,
`mlp.gate.e_score_correction_bias` / `mlp.gate.tid2eid`, `mlp.experts.gate_up_proj`
[E, 2I, D], `mlp.experts.down_proj` [E, D, I], `mlp.shared_experts.{gate,up,down}_proj`),
so a checkpoint's MoE loads as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sqrtsoftplus(x: torch.Tensor) -> torch.Tensor:
    """V4's router score: sqrt(softplus(x))."""
    return F.softplus(x).sqrt()


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(min(gate, limit)) * clamp(up, -limit, limit)."""
    return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


def _gate_weights(scores: torch.Tensor, indices: torch.Tensor, scale: float) -> torch.Tensor:
    """The chosen experts' scores, normalised over the k chosen, times route_scale."""
    w = scores.gather(1, indices)
    return w / (w.sum(dim=-1, keepdim=True) + 1e-20) * scale


class TopKRouter(nn.Module):
    """Learned routing (transformers' DeepseekV4TopKRouter): top-k of score + bias.
    forward(x [..., D]) -> (logits [N, E], weights [N, k], indices [N, k])."""

    def __init__(self, hidden_size: int, n_experts: int, top_k: int, route_scale: float = 1.5):
        super().__init__()
        self.top_k, self.route_scale = top_k, route_scale
        self.weight = nn.Parameter(torch.empty(n_experts, hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(n_experts))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(x.reshape(-1, self.weight.shape[1]), self.weight)
        scores = sqrtsoftplus(logits)
        indices = torch.topk(scores + self.e_score_correction_bias, self.top_k, dim=-1).indices
        return logits, _gate_weights(scores, indices, self.route_scale), indices


class HashRouter(nn.Module):
    """Hash routing (transformers' DeepseekV4HashRouter): the experts are `tid2eid[token]`,
    a fixed [vocab, k] table loaded from the checkpoint; the gate only weights them.
    forward(x [..., D], input_ids [...]) -> (logits, weights [N, k], indices [N, k])."""

    def __init__(
        self, hidden_size: int, n_experts: int, top_k: int, vocab_size: int, route_scale=1.5
    ):
        super().__init__()
        self.top_k, self.route_scale = top_k, route_scale
        self.weight = nn.Parameter(torch.empty(n_experts, hidden_size))
        self.register_buffer("tid2eid", torch.zeros(vocab_size, top_k, dtype=torch.long))
        nn.init.normal_(self.weight, std=0.02)

    def forward(
        self, x: torch.Tensor, input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(x.reshape(-1, self.weight.shape[1]), self.weight)
        indices = self.tid2eid[input_ids.reshape(-1)].long()
        return logits, _gate_weights(sqrtsoftplus(logits), indices, self.route_scale), indices


class V4MLP(nn.Module):
    """The shared expert: a SwiGLU with the clamp (transformers' DeepseekV4MLP)."""

    def __init__(self, hidden_size: int, inter: int, limit: float = 10.0):
        super().__init__()
        self.limit = limit
        self.gate_proj = nn.Linear(hidden_size, inter, bias=False)
        self.up_proj = nn.Linear(hidden_size, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(clamped_swiglu(self.gate_proj(x), self.up_proj(x), self.limit))


class V4Experts(nn.Module):
    """Routed experts, stacked (transformers' DeepseekV4Experts): token copies are sorted
    by expert and each chosen expert runs once on its slice."""

    def __init__(self, n_experts: int, hidden_size: int, inter: int, limit: float = 10.0):
        super().__init__()
        self.limit = limit
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * inter, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden_size, inter))
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor):
        """x [N, D], indices / weights [N, k] -> sum_k weight_k * expert_k(x) [N, D]."""
        k = indices.shape[1]
        flat = indices.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // k  # the token of each sorted copy
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = token[start : start + n]
                gate, up = F.linear(x[rows], self.gate_up_proj[e]).chunk(2, dim=-1)
                y = F.linear(clamped_swiglu(gate, up, self.limit), self.down_proj[e])
                w = weights.reshape(-1)[order[start : start + n]].unsqueeze(-1)
                out.index_add_(0, rows, (y * w).to(out.dtype))
            start += n
        return out


class V4MoE(nn.Module):
    """One V4 MoE layer (transformers' DeepseekV4SparseMoeBlock): routed experts chosen by
    a `TopKRouter`, or by a `HashRouter` when `hash_vocab_size` is given (the first
    layers), plus one always-on shared expert."""

    def __init__(
        self,
        hidden_size: int,
        inter: int,
        n_experts: int,
        top_k: int,
        route_scale: float = 1.5,
        swiglu_limit: float = 10.0,
        hash_vocab_size: int | None = None,
    ):
        super().__init__()
        self.is_hash = hash_vocab_size is not None
        if self.is_hash:
            self.gate = HashRouter(hidden_size, n_experts, top_k, hash_vocab_size, route_scale)
        else:
            self.gate = TopKRouter(hidden_size, n_experts, top_k, route_scale)
        self.experts = V4Experts(n_experts, hidden_size, inter, swiglu_limit)
        self.shared_experts = V4MLP(hidden_size, inter, swiglu_limit)

    def forward(
        self,
        x: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        counts: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [..., D] -> [..., D]. `counts`, when given, gets this layer's tokens per expert
        [E] appended if its routing is learned (what auxiliary-loss-free balancing reads;
        a hash layer's fixed table has no bias to move)."""
        if self.is_hash:
            if input_ids is None:
                raise ValueError("a hash-routed V4MoE layer needs input_ids (token ids)")
            _, weights, indices = self.gate(x, input_ids)
        else:
            _, weights, indices = self.gate(x)
            if counts is not None:
                E = self.experts.gate_up_proj.shape[0]
                counts.append(torch.bincount(indices.flatten(), minlength=E))
        flat = x.reshape(-1, x.shape[-1])
        return self.experts(flat, indices, weights).view_as(x) + self.shared_experts(x)
