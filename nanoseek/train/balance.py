"""Auxiliary-loss-free load balancing (DeepSeek-V3, section 2.1.2).

After every optimizer step each MoE layer moves its selection bias towards balance:
b_i += gamma * sign(mean_load - load_i), from the tokens each expert received during the
step (summed over micro-batches, and over ranks by the caller). The bias only changes which
experts are chosen, never the gating weights, so no gradient is disturbed.
"""

from __future__ import annotations

import torch

from nanoseek.model.moe import MoE
from nanoseek.model.moe_v4 import V4MoE


@torch.no_grad()
def update_expert_bias(layers: list[MoE | V4MoE], counts: torch.Tensor, gamma: float) -> None:
    """counts [n_layers, n_experts]: tokens routed to each expert during the step."""
    load = counts.float()
    step = gamma * torch.sign(load.mean(dim=1, keepdim=True) - load)
    for moe, delta in zip(layers, step, strict=True):
        bias = selection_bias(moe)
        bias += delta.to(bias.device)


def selection_bias(moe: MoE | V4MoE) -> torch.Tensor:
    """The layer's selection-only bias buffer: V3's `gate.bias`; V4's router keeps
    transformers' name, `gate.e_score_correction_bias`."""
    gate = moe.gate
    return gate.e_score_correction_bias if isinstance(moe, V4MoE) else gate.bias


def load_imbalance(counts: torch.Tensor) -> list[float]:
    """max/mean tokens per expert, per layer: 1.0 is perfect balance; E/k is total collapse."""
    load = counts.float()
    return (load.max(dim=1).values / load.mean(dim=1).clamp(min=1e-9)).tolist()


def gamma_at(progress: float, gamma: float, gamma_final: float) -> float:
    """Fast at first (routing starts unbalanced and a few hundred steps must fix it), then
    slower so the bias stops jittering: linear from gamma to gamma_final over the run, or
    over --gamma-tokens (`progress` is then the tokens seen over those)."""
    p = min(max(progress, 0.0), 1.0)
    return gamma + (gamma_final - gamma) * p
