"""AdamW with its moments in bf16: DeepSeek-V3's low-precision optimizer states.

DeepSeek-V3 (section 3.3.2) tracks AdamW's first and second moments in BF16 instead of FP32
"without incurring observable performance degradation", keeping the master weights and
gradients in FP32. That halves the optimizer's state (8 bytes a parameter to 4) and the bytes
a step moves (28 a parameter to 20), though on the CPUs measured so far the update is bound by
its square root and division, so no faster than torch's fused fp32 AdamW. bf16 keeps 8 bits
of mantissa: an update smaller than ~1/256 of a moment rounds away, so the second moment's
`1 - beta2` must not be tiny: DeepSeek's beta2 is 0.95 (5% a step), and `BF16AdamW` refuses
a beta2 above 0.99.

On CPU the step is one C++ pass per tensor (nanoseek/kernels/optim.cpp) where it builds;
elsewhere `reference_step`, the same math in torch ops (per tensor, fp32 arithmetic).
"""

from __future__ import annotations

import functools

import torch

from nanoseek.kernels import builds, optim_library
from nanoseek.train.config import MAX_BF16_BETA2


@functools.cache
def kernel_builds() -> bool:
    """Whether optim.cpp builds and loads here (once a process; a warning if not)."""
    return builds(optim_library, "AdamW with bf16 moments runs in torch ops instead")


class BF16AdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update (decoupled weight decay, bias correction) with `exp_avg`
    and `exp_avg_sq` stored in bf16 and the arithmetic in fp32. Like torch's fused AdamW it
    takes a `grad_scale` (set before `step`, a 0-d tensor or None) to divide the gradients by:
    the training runtime folds gradient clipping into it."""

    def __init__(
        self,
        params,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        if not 0.0 <= betas[1] <= MAX_BF16_BETA2:
            raise ValueError(
                f"bf16 optimizer states need beta2 <= {MAX_BF16_BETA2} (got {betas[1]}): "
                "smaller updates to the second moment round away in bf16; use fp32 states"
            )
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.grad_scale: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._state(p) for p in params]
            counts = [state["step"] for state in states]
            torch._foreach_add_(counts, 1)
            steps = [int(t) for t in torch.stack(counts).tolist()]  # one read, not one a tensor
            grads = [p.grad for p in params]
            ms = [state["exp_avg"] for state in states]
            vs = [state["exp_avg_sq"] for state in states]
            beta1, beta2 = group["betas"]
            args = (group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
            if _use_kernel(params, grads):
                torch.ops.nanoseek.adamw_bf16_(params, grads, ms, vs, steps, *args, self.grad_scale)
            else:
                for p, g, m, v, t in zip(params, grads, ms, vs, steps, strict=True):
                    reference_step(p, g, m, v, t, *args, self.grad_scale)
        return loss

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
        # load_state_dict casts a state to its parameter's dtype: back to bf16 (exact)
        for key in ("exp_avg", "exp_avg_sq"):
            if state[key].dtype != torch.bfloat16:
                state[key] = state[key].to(torch.bfloat16)
        return state


def _use_kernel(params: list[torch.Tensor], grads: list[torch.Tensor]) -> bool:
    plain = all(  # not a DTensor (FSDP2 / EP shards: the reference's torch ops take them)
        getattr(t, "device_mesh", None) is None
        and t.device.type == "cpu"
        and t.dtype == torch.float32
        and t.is_contiguous()
        for t in (*params, *grads)
    )
    return plain and kernel_builds()


def reference_step(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_scale: torch.Tensor | None = None,
) -> None:
    """One AdamW update of `p` in place, the moments `m`, `v` (bf16) widened to fp32 for the
    arithmetic and rounded back once: the kernel's math in torch ops."""
    g = g.float() if grad_scale is None else g.float() / grad_scale
    m32, v32 = m.float(), v.float()
    m32.lerp_(g, 1 - beta1)
    v32.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    p.mul_(1 - lr * weight_decay)
    denom = (v32.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    p.addcdiv_(m32, denom, value=-lr / (1 - beta1**step))
    m.copy_(m32)
    v.copy_(v32)
