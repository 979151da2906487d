"""Cross-entropy of the output head without materialising float32 logits for the batch.

`linear_cross_entropy(h, w, targets)` equals `F.cross_entropy((h @ w.T).float(), targets,
ignore_index=-100)`. Rows go through in chunks: each chunk's logits are made, reduced to
its loss and turned straight into softmax - one_hot, in the compute dtype. The backward is
then just two matmuls (1/n and the ignored rows scale their [N, d] side). Over an 8192
vocabulary this replaces several full [tokens, vocab] float32 passes (cast, log-softmax,
zero-fill, their backwards) by work on cache-sized chunks. On CPU the chunk's softmax runs
in one C++ pass (nanoseek/kernels/loss.cpp) where that builds; elsewhere, and under
torch.compile (which fuses the same work itself), in torch ops.
"""

from __future__ import annotations

import functools

import torch

from nanoseek.kernels import builds, loss_library

# rows per chunk (256 x 8192 float32 log-probs = 8 MB): measured on 2 cores, 16-bit
# matmuls run the loss ~10% faster in chunks of 128 rows, fp32 ones (MKL) in 256. With the
# C++ softmax (one row at a time in L1) only the matmul cares: each bf16 call re-lays the
# whole head weight out for oneDNN, so fewer, larger chunks (512: the loss's forward ~10%
# faster than 128 on an AMX Xeon, one thread)
CHUNK = 256
CHUNK_16BIT = 128
KERNEL_CHUNK_16BIT = 512


@functools.cache
def kernel_builds() -> bool:
    """Whether loss.cpp builds and loads here (once a process; a warning if not)."""
    return builds(loss_library, "the loss runs in torch ops instead")


def _use_kernel(h: torch.Tensor) -> bool:
    return (
        h.device.type == "cpu"
        and h.dtype in (torch.float32, torch.bfloat16)
        and not torch.compiler.is_compiling()
        and kernel_builds()
    )


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, targets):
        valid = targets != -100
        n = valid.sum()
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        # softmax - one_hot, unscaled: the backward applies 1/n and the ignored rows' zeros
        # to the [N, d] side of its matmuls instead of another pass over [N, vocab]
        probs = h.new_empty(h.shape[0], w.shape[0]) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        t = targets.clamp(min=0)[:, None]
        kernel = _use_kernel(h)
        chunk = CHUNK if h.dtype == torch.float32 else KERNEL_CHUNK_16BIT if kernel else CHUNK_16BIT
        for start in range(0, h.shape[0], chunk):
            rows = slice(start, start + chunk)
            if kernel:  # the logits made in place of their gradient rows, then turned into them
                logits = torch.mm(h[rows], w.t(), out=probs[rows]) if need_grad else h[rows] @ w.t()
                row_loss = torch.ops.nanoseek.softmax_xent_(logits, t[rows].view(-1))
                total += (row_loss * valid[rows]).sum()
                continue
            logp = (h[rows] @ w.t()).log_softmax(-1, dtype=torch.float32)
            total -= (logp.gather(1, t[rows]).squeeze(1) * valid[rows]).sum()
            if need_grad:
                p = logp.exp_()  # softmax, in place over the chunk's log-probs
                p.scatter_add_(1, t[rows], torch.full_like(t[rows], -1, dtype=p.dtype))
                probs[rows] = p
        ctx.save_for_backward(h, w, probs, valid, n)
        return total / n  # nan when every target is ignored, like F.cross_entropy

    @staticmethod
    def backward(ctx, grad):
        h, w, probs, valid, n = ctx.saved_tensors
        row = (valid * (grad / n.clamp(min=1)))[:, None].to(h.dtype)  # d loss / d row's logits
        dh = (probs @ w) * row if ctx.needs_input_grad[0] else None
        dw = probs.t() @ (h * row) if ctx.needs_input_grad[1] else None
        return dh, dw, None


def linear_cross_entropy(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """h [N, d], head weight w [V, d], targets [N] (-100 = ignore) -> mean loss (float32).
    Under autocast the matmuls run in the autocast dtype, as `nn.Linear` would."""
    if torch.is_autocast_enabled(h.device.type):
        dt = torch.get_autocast_dtype(h.device.type)
        h, w = h.to(dt), w.to(dt)
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h, w, targets)
