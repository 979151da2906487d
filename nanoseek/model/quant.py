"""Weights for CPU decoding in nanoseek's own kernels (`nanoseek.kernels`): fp32 by
default, int8 with the engine's `quantize="int8"`.

At batch 1 a decode step reads each weight it uses once: 37 MB per token for `small` in
fp32, through ~55 one-row matmuls that MKL runs at about half the machine's bandwidth.
`F32Weight` keeps a folded [in, out] weight as rows [out, in] (nn.Linear's layout) for the
fp32 kernel, 1.2-3x MKL's speed up to F32_KERNEL_ROWS rows (more: MKL, which wins from
~16). `Int8Weight` keeps int8 rows with one fp32 scale per row (symmetric, round to
nearest; activations stay fp32: weight-only) for the int8 kernel, a quarter of the bytes;
for more than KERNEL_ROWS rows (a long prompt's prefill) the weight is dequantized and MKL
runs it. `kernel_folded` converts what every token reads: attention projections, dense
MLPs, shared experts, the MTP module's projection and the head; and a MoE's routed experts
(`experts_mm`: each chosen expert read in place, once for the tokens that share it;
larger batches keep the grouped path).
The gate stays as it was, and so does a "dense"-folded MoE, whose matrix holds the gate,
and any weight whose rows are not a multiple of 8 wide (the kernels read them 8 at a time).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

import nanoseek.kernels  # noqa: F401  (its decode_library() loads the torch.ops.nanoseek kernels)

QUANTIZE = ("int8",)
KERNEL_ROWS = 64  # up to this many rows: the int8 kernel; more: dequantize, one fp32 matmul
F32_KERNEL_ROWS = 8  # up to this many rows: the fp32 kernel; more: MKL
# The fp32 kernel by default only for models of at least this size: a smaller one decodes
# from cache, where MKL's lower call overhead wins (the r1 recipe's 3.6 MB model: MKL 1.2x)
F32_KERNEL_MIN_BYTES = 16 << 20


@dataclass
class F32Weight:
    rows: torch.Tensor  # [out, in] fp32, row-major

    @classmethod
    def folded(cls, w: torch.Tensor) -> F32Weight:
        """A folded weight w [in, out] (used as x @ w); no copy when w is a transposed view."""
        return cls(w.detach().t().contiguous())


@dataclass
class Int8Weight:
    q: torch.Tensor  # [out, in] int8
    scale: torch.Tensor  # [out] fp32

    @classmethod
    def rows(cls, w: torch.Tensor) -> Int8Weight:
        """Quantize w [rows, K], one scale per row."""
        w = w.detach().float()
        scale = w.abs().amax(1).clamp_min(1e-12) / 127
        q = (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        return cls(q.contiguous(), scale.contiguous())

    @classmethod
    def folded(cls, w: torch.Tensor) -> Int8Weight:
        """A folded weight w [in, out] (used as x @ w)."""
        return cls.rows(w.t())

    def dequantized(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]


def mm(x: torch.Tensor, w: torch.Tensor | F32Weight | Int8Weight) -> torch.Tensor:
    """x @ w, for a plain [in, out] weight or a kernel's weight."""
    if isinstance(w, torch.Tensor):
        return x @ w
    rows = x.reshape(-1, x.shape[-1])
    if isinstance(w, F32Weight):
        if rows.shape[0] > F32_KERNEL_ROWS:
            y = rows @ w.rows.t()
        else:
            y = torch.ops.nanoseek.gemm_f32(rows, w.rows)
    elif rows.shape[0] > KERNEL_ROWS:
        y = rows @ w.dequantized().t()
    else:
        y = torch.ops.nanoseek.gemm_q8(rows, w.q, w.scale)
    return y.view(*x.shape[:-1], -1)


def experts_mm(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, experts: tuple):
    """Routed experts in the kernels: x [T, d], each token's experts idx [T, k] and routing
    weights [T, k]; experts = (w13 rows [E * 2I, d], w2 rows [E * d, I]) -> [T, d]."""
    w13, w2 = experts
    if isinstance(w13, F32Weight):
        return torch.ops.nanoseek.moe_f32(x, weights, idx, w13.rows, w2.rows)
    return torch.ops.nanoseek.moe_q8(x, weights, idx, w13.q, w13.scale, w2.q, w2.scale)


def kernel_folded(folded, experts: list, mtp_experts: list, quantize: str | None = None):
    """The FoldedModel with its every-token matmuls in the kernels, in int8 with
    quantize="int8" (a new object; the one given is left as it was). `experts` /
    `mtp_experts`: the routed Experts module of each layer / of each MTP module's block (None
    where there is none)."""
    convert = Int8Weight.folded if quantize == "int8" else F32Weight.folded

    def q(w):  # the kernel reads rows in steps of 8: other widths stay as they are
        return convert(w) if w is not None and w.dim() == 2 and fits(w.shape[0]) else w

    def ffn(f, ex):
        if f.dispatch == "dense":  # the gate is inside w13, and the experts with it
            return f
        routed = None
        if ex is not None and fits(ex.w13.shape[2]) and fits(ex.inter):
            # w13 [E, 2I, d] -> rows [E*2I, d]; w2 [E, d, I] -> rows [E*d, I]
            w13, w2 = ex.w13.detach().flatten(0, 1), ex.w2.detach().flatten(0, 1)
            if quantize == "int8":
                routed = (Int8Weight.rows(w13), Int8Weight.rows(w2))
            else:  # the model's own tensors, read in place
                routed = (F32Weight(w13), F32Weight(w2))
        return dataclasses.replace(f, experts_kernel=routed, w13=q(f.w13), w2=q(f.w2))

    def attn(a):
        return dataclasses.replace(a, w_in=q(a.w_in), wq=q(a.wq), wo=q(a.wo))

    def block(b, ex):
        return dataclasses.replace(b, attn=attn(b.attn), ffn=ffn(b.ffn, ex))

    layers = [block(b, ex) for b, ex in zip(folded.layers, experts, strict=True)]
    mtp = [  # folded only when the engine drafts
        dataclasses.replace(m, eh=q(m.eh), block=block(m.block, ex))
        for m, ex in zip(folded.mtp, mtp_experts[: len(folded.mtp)], strict=True)
    ]
    return dataclasses.replace(folded, layers=layers, mtp=mtp, head=q(folded.head))


def fits(k: int) -> bool:
    return k % 8 == 0
