"""RMSNorm, computed in float32 like the reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel, same numbers
            out = F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        else:
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            out = self.weight * h.to(x.dtype)
        # Every consumer is a matmul, which autocast would feed the same rounded values:
        # casting once here saves a cast (and its backward) per consumer.
        if torch.is_autocast_enabled(x.device.type):
            out = out.to(torch.get_autocast_dtype(x.device.type))
        return out

    # --- the cached-decoding form: the weight is folded into the next matmul's columns ---
    def eps_tensor(self, device: torch.device) -> torch.Tensor:
        """eps as a 0-dim fp32 tensor, made once (eps.item() per call would sync a GPU)."""
        return torch.tensor(self.eps, dtype=torch.float32, device=device)


def rms_scale(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """1 / rms(x), [..., 1] in fp32: mean(x^2) = |x|^2 / n, in fewer ops than F.rms_norm's
    on CPU."""
    ss = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
    return torch.addcmul(eps, ss, ss, value=1.0 / x.shape[-1]).rsqrt_()


def rms_unweighted(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """RMSNorm without its weight (folded into the matmul that follows). Non-fp32 inputs take
    the module's float32 round trip."""
    if x.dtype != torch.float32:
        return (x.float() * rms_scale(x, eps)).to(x.dtype)
    return x * rms_scale(x, eps)
