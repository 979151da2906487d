"""Cross-entropy of the output head without materialising float32 logits for the batch.

`linear_cross_entropy(h, w, targets)` equals `F.cross_entropy((h @ w.T).float(), targets,
ignore_index=-100)`. Rows go through in chunks: each chunk's logits are made, reduced to
its loss and turned straight into d loss / d logits (softmax - one_hot) / n, in the compute
dtype. The backward is then just two matmuls. Over an 8192 vocabulary this replaces several
full [tokens, vocab] float32 passes (cast, log-softmax, zero-fill, their backwards) by work
on cache-sized chunks.
"""

from __future__ import annotations

import torch

CHUNK = 256  # rows per chunk: 256 x 8192 float32 logits = 8 MB


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, targets):
        n = (targets != -100).sum()
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        dlogits = h.new_empty(h.shape[0], w.shape[0]) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], CHUNK):
            rows = slice(start, start + CHUNK)
            logits = (h[rows] @ w.t()).float()
            t = targets[rows]
            valid = t != -100
            t = t.clamp(min=0)[:, None]
            lse = logits.logsumexp(dim=-1, keepdim=True)
            total += ((lse - logits.gather(1, t)).squeeze(1) * valid).sum()
            if need_grad:
                probs = logits.sub_(lse).exp_()  # softmax, in place over the chunk's logits
                probs.scatter_add_(1, t, torch.full_like(t, -1, dtype=probs.dtype))
                probs *= valid[:, None] / n.clamp(min=1)
                dlogits[rows] = probs
        ctx.save_for_backward(h, w, dlogits)
        return total / n  # nan when every target is ignored, like F.cross_entropy

    @staticmethod
    def backward(ctx, grad):
        h, w, dlogits = ctx.saved_tensors
        dh = (dlogits @ w) * grad if ctx.needs_input_grad[0] else None
        dw = (dlogits.t() @ h) * grad if ctx.needs_input_grad[1] else None
        return dh, dw, None


def linear_cross_entropy(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """h [N, d], head weight w [V, d], targets [N] (-100 = ignore) -> mean loss (float32).
    Under autocast the matmuls run in the autocast dtype, as `nn.Linear` would."""
    if torch.is_autocast_enabled(h.device.type):
        dt = torch.get_autocast_dtype(h.device.type)
        h, w = h.to(dt), w.to(dt)
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h, w, targets)
