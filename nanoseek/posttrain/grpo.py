"""The math of GRPO and its two best-known fixes, as pure functions (the loop lives elsewhere).

For a prompt q the policy samples a group of G completions o_1..o_G with rewards R_1..R_G.
Per token, the ratio to the policy that sampled them and the clipped surrogate are

    r_i,t = pi_theta(o_i,t | q, o_i,<t) / pi_old(o_i,t | q, o_i,<t)
    s_i,t = min(r_i,t * A_i, clip(r_i,t, 1 - eps_low, 1 + eps_high) * A_i)

and the KL to a frozen reference uses the k3 estimator (unbiased, always >= 0):

    D_i,t = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1

The variants differ in the advantage and in how tokens are averaged (loss = -objective):

    grpo     (DeepSeekMath, eq. 3)  A_i = (R_i - mean(R)) / std(R)
             J = 1/G sum_i 1/|o_i| sum_t (s_i,t - beta D_i,t)            eps_low = eps_high
    dr_grpo  (Dr. GRPO, Liu et al. 2025)  A_i = R_i - mean(R)
             J = 1/G sum_i 1/L_max sum_t (s_i,t - beta D_i,t)            L_max: a constant
    dapo     (DAPO, Yu et al. 2025)  A_i = (R_i - mean(R)) / std(R)
             J = 1 / sum_i |o_i| sum_i sum_t (s_i,t - beta D_i,t)        eps_high > eps_low

GRPO's 1/|o_i| favours short correct answers and long wrong ones (a wrong answer's penalty
is spread thinner the longer it is); Dr. GRPO and DAPO weigh every token alike. Dividing
by std(R) up-weights groups that are nearly all right or all wrong; Dr. GRPO drops it.
DAPO and Dr. GRPO use beta = 0. Here the sums over a batch of B = N * G completions are the
same as over groups, since every group has G members.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoseek.posttrain.errors import PostTrainError

VARIANTS = ("grpo", "dr_grpo", "dapo")


@dataclass
class GRPOConfig:
    """The loss settings of one variant; `GRPOConfig.for_variant(v)` gives the recommended ones."""

    variant: str = "grpo"
    beta: float = 0.04  # KL weight; 0 = no reference model needed
    epsilon: float = 0.2  # eps_low
    epsilon_high: float = 0.2
    scale_std: bool = True  # divide advantages by the group's reward std
    mask_truncated: bool = False  # drop completions cut at max_tokens from the loss (DAPO)
    overlong_cache: int = 0  # DAPO soft overlong punishment window, in tokens (0 = off)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise PostTrainError(
                f"unknown GRPO variant {self.variant!r}; choose one of: {', '.join(VARIANTS)}"
            )
        if self.beta < 0 or not 0 <= self.epsilon < 1 or self.epsilon_high < 0:
            raise PostTrainError(
                f"need beta >= 0, 0 <= epsilon < 1, epsilon_high >= 0; got beta={self.beta}, "
                f"epsilon={self.epsilon}, epsilon_high={self.epsilon_high}"
            )
        if self.overlong_cache < 0:
            raise PostTrainError(f"overlong_cache must be >= 0, got {self.overlong_cache}")

    @classmethod
    def for_variant(cls, variant: str) -> GRPOConfig:
        if variant == "dr_grpo":
            return cls(variant, beta=0.0, scale_std=False)
        if variant == "dapo":
            return cls(variant, beta=0.0, epsilon_high=0.28, mask_truncated=True)
        return cls(variant)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_std: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """rewards [N * G] (each prompt's G completions adjacent) -> advantages [N * G]: reward
    minus its group's mean, over the group's (unbiased) std + eps when `scale_std`. A group
    whose rewards are all equal gets exactly 0: it says nothing about which completion is
    better."""
    if group_size < 2 or rewards.dim() != 1 or rewards.numel() % group_size:
        raise PostTrainError(
            f"rewards must be 1-D with a multiple of group_size >= 2 entries; got shape "
            f"{tuple(rewards.shape)} and group_size {group_size}"
        )
    r = rewards.float().view(-1, group_size)  # [N, G]
    adv = r - r.mean(1, keepdim=True)
    if scale_std:
        adv = adv / (r.std(1, keepdim=True) + eps)
    flat = (r == r[:, :1]).all(1, keepdim=True)  # exact zeros, whatever rounding the mean did
    return adv.masked_fill(flat, 0.0).view(-1)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] bool: groups whose rewards differ. DAPO's dynamic sampling keeps only these (the
    others have zero advantage and only dilute the batch)."""
    r = rewards.view(-1, group_size)
    return (r != r[:, :1]).any(1)


def overlong_penalty(lengths: torch.Tensor, max_len: int, cache: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (eq. 13), added to the task reward:

        0                               |o| <= L_max - L_cache
        ((L_max - L_cache) - |o|) / L_cache    L_max - L_cache < |o| <= L_max
        -1                              L_max < |o|

    `lengths` [B] completion lengths in tokens; `cache` = L_cache (0 = off)."""
    if cache <= 0:
        return torch.zeros(lengths.shape, dtype=torch.float32, device=lengths.device)
    if cache > max_len:
        raise PostTrainError(f"overlong cache {cache} exceeds max_len {max_len}")
    return ((max_len - cache - lengths.float()) / cache).clamp(-1.0, 0.0)


def mask_truncated(mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """mask [B, T] with the rows of truncated completions ([B] bool, finish_reason "length")
    zeroed: DAPO's overlong filtering, so a cut-off answer is neither rewarded nor punished."""
    return mask * ~truncated.to(torch.bool)[:, None]


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    variant: str = "grpo",
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    max_len: int | None = None,
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss (-J above) and detached stats, from per-token log-probs [B, T] of the sampled
    tokens under the current, sampling (`old_logp`; None = on-policy, i.e. logp detached) and
    reference policies; `advantages` [B] or [B, T]; `mask` [B, T] marks completion tokens.
    `epsilon_high` defaults to `epsilon`; `max_len` (dr_grpo's constant, default T) should be
    the sampling max_tokens, the same for every batch. Masked positions must hold finite
    numbers (pad log-probs with 0). `normalizer`: what the batch's sum is divided by, the
    number of sequences (grpo, dr_grpo; times max_len for dr_grpo) or of tokens (dapo);
    default this batch's own. Under gradient accumulation pass the whole step's, so the
    micro-batches' losses add up to the full batch's.

    stats: clip_low / clip_high (fraction of tokens whose gradient the clip removed, A < 0
    with r < 1 - eps_low / A > 0 with r > 1 + eps_high), kl (mean k3), ratio (mean r)."""
    if variant not in VARIANTS:
        raise PostTrainError(
            f"unknown GRPO variant {variant!r}; choose one of: {', '.join(VARIANTS)}"
        )
    if beta > 0 and ref_logp is None:
        raise PostTrainError("beta > 0 needs ref_logp (the reference policy's log-probs)")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    m = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)
    adv = adv[:, None] if adv.dim() == 1 else adv  # a sequence's advantage on each of its tokens
    old = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(logp - old)
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - epsilon, 1 + eps_high) * adv)
    per_token = -surrogate
    kl = None
    if ref_logp is not None:
        log_r = ref_logp - logp  # log(pi_ref / pi_theta)
        kl = torch.exp(log_r) - log_r - 1
        if beta > 0:
            per_token = per_token + beta * kl

    B = m.shape[0]
    if variant == "grpo":  # mean over each sequence's tokens, then over sequences
        loss = ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).sum() / (normalizer or B)
    elif variant == "dr_grpo":  # a constant divisor: no length bias
        loss = (per_token * m).sum() / ((normalizer or B) * (max_len or m.shape[1]))
    else:  # dapo: mean over every token of the batch
        loss = (per_token * m).sum() / (normalizer or m.sum().clamp(min=1))

    with torch.no_grad():
        n = m.sum().clamp(min=1)
        low = ((ratio < 1 - epsilon) & (adv < 0)).to(m.dtype)
        high = ((ratio > 1 + eps_high) & (adv > 0)).to(m.dtype)
        stats = {
            "clip_low": (low * m).sum() / n,
            "clip_high": (high * m).sum() / n,
            "kl": (kl * m).sum() / n if kl is not None else torch.zeros(()),
            "ratio": (ratio * m).sum() / n,
        }
    return loss, {k: v.detach() for k, v in stats.items()}
