"""Rotary position embedding with YaRN scaling, as pure functions.

DeepSeek rotates interleaved pairs (x0, x1), (x2, x3), ... of the decoupled rope part.
We rotate the even/odd slices and write them back as [evens | odds]: queries and keys get
the same permutation, so every dot product equals the interleaved form's.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from nanoseek.config import is_yarn


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_frequencies(dim: int, theta: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """Per-pair angular frequencies [dim/2]; YaRN blends interpolated and original ones."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
    inv_freq = 1.0 / theta**exponents
    if not is_yarn(scaling):
        return inv_freq
    factor = float(scaling["factor"])
    orig = scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(
        0, 1
    )
    keep_original = 1 - ramp  # high-frequency pairs keep their original frequency
    return inv_freq / factor * (1 - keep_original) + inv_freq * keep_original


def attention_factor(scaling: dict[str, Any] | None) -> float:
    """YaRN's multiplier on cos/sin (1.0 when mscale == mscale_all_dim, as in DeepSeek-V3)."""
    if not is_yarn(scaling):
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = float(scaling["factor"])
    mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all:
        return _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
    return _yarn_mscale(factor)


def softmax_scale(qk_head_dim: int, scaling: dict[str, Any] | None) -> float:
    """1/sqrt(d_qk), times mscale^2 under YaRN (longer contexts sharpen the softmax)."""
    scale = qk_head_dim**-0.5
    if is_yarn(scaling) and scaling.get("mscale_all_dim"):
        m = _yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"]))
        scale *= m * m
    return scale


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, factor: float = 1.0):
    """positions [..., T] -> (cos, sin) [..., T, dim/2] in float32."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    return angles.cos() * factor, angles.sin() * factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, d] (or [B, T, d] with cos/sin [B, T, d/2]); returns [evens' | odds']."""
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


# --- the cached-decoding form -------------------------------------------------------------
# Decoding folds the [evens | odds] permutation into the projection weights, together with a
# "swapped" copy ([odds | evens]) of each rope slice, so that RoPE is two fused ops:
# [x1 cos - x2 sin | x2 cos + x1 sin] = x * [cos | cos] + x_swapped * [-sin | sin].


def rope_permutations(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row orders that turn an interleaved rope slice into [evens | odds] and [odds | evens]."""
    perm = torch.cat([torch.arange(0, dim, 2), torch.arange(1, dim, 2)])
    return perm, torch.cat([perm[dim // 2 :], perm[: dim // 2]])


def rope_table(
    n_positions: int, inv_freq: torch.Tensor, factor: float, dtype: torch.dtype, device
) -> torch.Tensor:
    """[P, 2, 1, dim]: ([cos | cos], [-sin | sin]) for every position, made once per engine."""
    cos, sin = cos_sin(torch.arange(n_positions, device=device), inv_freq, factor)
    table = torch.stack([torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)], 1)
    return table[:, :, None].to(dtype)


def rotate_folded(x: torch.Tensor, x_swapped: torch.Tensor, cos2, sin2) -> torch.Tensor:
    """apply_rope for a slice that came out of a folded projection with its swapped copy."""
    return torch.addcmul(x * cos2, x_swapped, sin2)
