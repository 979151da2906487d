"""Int8 weights for CPU decoding (the engine's `quantize="int8"`).

At batch 1 a decode step reads each weight it uses once: 37 MB per token for `small` in
fp32, through ~55 one-row matmuls that MKL runs far below the machine's bandwidth.
`Int8Weight` keeps a folded [in, out] weight as int8 rows [out, in] with one fp32 scale per
row (symmetric, round to nearest); activations stay fp32 (weight-only), and the product runs
in nanoseek's AVX2 kernel (`nanoseek.kernels.gemm_q8`): a quarter of the bytes. For more
than KERNEL_ROWS rows (a long prompt's prefill) the weight is dequantized and MKL runs it.
`quantize_folded` converts what every token reads: attention projections, dense MLPs,
shared experts, the MTP module's projection and the head; and a MoE's routed experts
(`moe_q8`: each chosen expert read in place; larger batches keep the fp32 experts). The
gate stays fp32, and so does a "dense"-folded MoE, whose matrix holds the gate, and any
weight whose rows are not a multiple of 8 wide (the kernel reads them 8 at a time).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

import nanoseek.kernels  # noqa: F401  (registers torch.ops.nanoseek.gemm_q8 / moe_q8)

QUANTIZE = ("int8",)
KERNEL_ROWS = 64  # up to this many rows: the int8 kernel; more: dequantize, one fp32 matmul


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


def mm(x: torch.Tensor, w: torch.Tensor | Int8Weight) -> torch.Tensor:
    """x @ w, for a plain [in, out] weight or an Int8Weight."""
    if not isinstance(w, Int8Weight):
        return x @ w
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > KERNEL_ROWS:
        y = rows @ w.dequantized().t()
    else:
        y = torch.ops.nanoseek.gemm_q8(rows, w.q, w.scale)
    return y.view(*x.shape[:-1], -1)


def quantize_folded(folded, experts: list, mtp_experts: list):
    """The FoldedModel with its every-token matmuls in int8 (a new object; the fp32 one is
    left as it was). `experts` / `mtp_experts`: the routed Experts module of each layer / of
    each MTP module's block (None where there is none)."""

    def q(w):  # the kernel reads rows in steps of 8: other widths stay fp32
        return Int8Weight.folded(w) if w is not None and w.dim() == 2 and fits(w.shape[0]) else w

    def ffn(f, ex):
        if f.dispatch == "dense":  # the gate is inside w13, and the experts with it
            return f
        routed = None
        if ex is not None and fits(ex.w13.shape[2]) and fits(ex.inter):
            # w13 [E, 2I, d] -> rows [E*2I, d]; w2 [E, d, I] -> rows [E*d, I]
            routed = (Int8Weight.rows(ex.w13.flatten(0, 1)), Int8Weight.rows(ex.w2.flatten(0, 1)))
        return dataclasses.replace(f, experts_q8=routed, w13=q(f.w13), w2=q(f.w2))

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
