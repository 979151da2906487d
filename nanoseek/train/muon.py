"""Muon for the weight matrices, AdamW for the rest, as one optimizer (`--optimizer muon`).

Muon (Jordan et al., 2024; at scale in Moonshot's Kimi K2 and DeepSeek-V4): take the
momentum of the gradient, replace it by the nearest semi-orthogonal matrix (five
Newton-Schulz iterations of U S V^T -> U V^T), and step along that, so every direction of a
matrix moves by the same amount instead of the few that dominate the gradient. The update is
scaled by 0.2 sqrt(max(rows, cols)) (Moonshot's "match_rms_adamw"), which gives it AdamW's
update RMS: one `--lr`, weight decay and schedule serve both halves.

`torch.optim.Muon` does this for 2-D weights only; the routed experts are stacked 3-D
([experts, rows, cols]), so here every expert's matrix is orthogonalised on its own, in one
batched computation. The embedding, the output head, the router and every vector (norms)
stay on AdamW (torch's fused kernel), as in Muon's recipe and DeepSeek-V4's. In a V4 model
the hyper-connections' projections and the compressors' position biases stay on AdamW too;
V4's grouped output projection (`o_a_proj`, its groups' matrices stacked by rows) is
orthogonalised as the one matrix it is stored as.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.adamw import adamw

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Jordan's quintic: fast, not exact, convergence


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to each matrix of g [..., m, n] (approximately:
    singular values end up in about [0.7, 1.2]), by Newton-Schulz iteration in fp32."""
    a, b, c = NS_COEFFICIENTS
    x = g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)  # singular values <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


# Matrices that stay on AdamW, by name: embedding and head (Transformer's `embed.` / `head.`,
# V4Transformer's `model.embed_tokens.` / `lm_head.`), the routers (`.gate.`), and in V4 the
# hyper-connections' mixing projections (`attn_hc.` / `ffn_hc.` / `hc_head.`: small maps to
# a few gating logits, not hidden-to-hidden) and the compressors' `position_bias` (a bias
# table, not a map).
ADAMW_PREFIXES = ("embed.", "head.", "model.embed_tokens.", "lm_head.")
ADAMW_PARTS = (".gate.", "_hc.", "hc_head.", "position_bias")


def muon_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(the matrices Muon trains, the rest): every weight matrix inside the blocks (attention
    projections, V4's compressors and indexers, dense and expert FFNs, MTP projections) but
    the router's; embeddings, head, router, V4's hyper-connections and position biases, and
    vectors go to AdamW."""
    muon, rest = [], []
    for name, p in model.named_parameters():
        outside = name.startswith(ADAMW_PREFIXES) or any(part in name for part in ADAMW_PARTS)
        (rest if p.dim() < 2 or outside else muon).append(p)
    return muon, rest


class MuonAdamW(torch.optim.Optimizer):
    """Parameter groups with `muon=True` take Muon steps (momentum, nesterov, orthogonalised,
    decoupled weight decay); the others AdamW's. One `lr` per group, as in AdamW."""

    def __init__(
        self,
        param_groups: list[dict],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        momentum: float = 0.95,
        ns_steps: int = 5,
    ):
        defaults = dict(
            lr=lr, betas=betas, eps=eps, momentum=momentum, ns_steps=ns_steps, muon=False
        )
        super().__init__(param_groups, defaults)
        for group in self.param_groups:
            if group["muon"]:
                for p in group["params"]:
                    if p.dim() < 2 or _sharded_within_a_matrix(p):
                        raise ValueError(
                            "--optimizer muon needs each weight matrix whole on its rank: "
                            "use --parallel ddp (FSDP2 shards matrices by rows)"
                        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon if group["muon"] else self._adamw)(group, params)
        return loss

    def _muon(self, group: dict, params: list[nn.Parameter]) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:  # shaped like p (a DTensor under EP)
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            g, buf, w = _local(p.grad), _local(state["momentum_buffer"]), _local(p)
            buf.lerp_(g, 1 - mu)
            update = orthogonalize(g.lerp(buf, mu), group["ns_steps"])  # nesterov
            w.mul_(1 - lr * wd)
            w.add_(update, alpha=-lr * 0.2 * math.sqrt(max(w.shape[-2:])))

    def _adamw(self, group: dict, params: list[nn.Parameter]) -> None:
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        adamw(
            params,
            [p.grad for p in params],
            [self.state[p]["exp_avg"] for p in params],
            [self.state[p]["exp_avg_sq"] for p in params],
            [],
            [self.state[p]["step"] for p in params],
            fused=True,  # one kernel over the group, as build_optimizer's AdamW
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )


def _local(x: torch.Tensor) -> torch.Tensor:
    """A DTensor's local part (whole matrices for EP's experts), a tensor as is; in-place
    changes to it change the DTensor."""
    return x.to_local() if hasattr(x, "to_local") else x


def _sharded_within_a_matrix(p: torch.Tensor) -> bool:
    """A DTensor split along one of its last two dims (FSDP2's rows), not only over experts."""
    placements = getattr(p, "placements", ())
    return any(getattr(pl, "dim", None) in (p.dim() - 2, p.dim() - 1) for pl in placements)
