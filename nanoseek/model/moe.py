"""DeepSeekMoE: a gate, fine-grained routed experts, and always-on shared experts.

Gate (V3): s = sigmoid(x W_gate). Experts are *selected* by s + b, where b is a
per-expert bias moved by the trainer towards balanced load (auxiliary-loss-free
balancing); the *weights* use s alone, normalised over the chosen experts, times
route_scale. Group-limited routing: a group scores the sum of its top-2 (s + b) and each
token first picks `topk_group` groups. V2's softmax gate is supported for loading.

`Gate.route` is the one routing function: training (`MoE.forward`) and cached decoding
(`MoE.decode`) both call it. Each FFN also has a decode form: `fold` rearranges its weights
once (the preceding norm's weight folded in) and `decode` runs them on [tokens, d] rows,
dispatching tokens to experts in the way that is fastest for the experts' size:
- "dense": small experts (all of them in under 1 MB) run as ONE matmul in and one out, the
  gate and the shared expert included; unchosen experts weigh 0. Fewest ops.
- "grouped": `F.grouped_mm` over tokens sorted by expert reads each chosen expert's weights
  in place: no copies, no host sync, no Python loop (CPU).
- "gathered": each token's k experts gathered and run as one batched matmul (GPUs; few
  tokens), falling back to "sorted" when the gathered weights would be large.
- "sorted": `Experts.forward`, the training path.
Under torch.compile (the engine's `compile=True`) "grouped" and "gathered" run
`MoE._compiled`: few tokens read their experts in place in one fused kernel per projection.

Training runs the experts as one autograd node looping over them (`_ExpertLoop`); on CPU
the loop is C++ (`_FusedExpertLoop`, nanoseek/kernels/experts.cpp) where it builds. On CUDA
in bf16 they run as grouped GEMMs instead (`Experts.grouped`: no loop, no host sync).
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from nanoseek.config import ModelConfig
from nanoseek.kernels import builds, experts_library
from nanoseek.model.norm import RMSNorm
from nanoseek.model.quant import experts_mm, mm

PAD = 64  # rows: expert slices are padded to a multiple of this (see Experts.forward)
DENSE_EXPERTS_MAX_BYTES = 1 << 20  # "auto": experts this small run as one dense matmul
GROUPED_FROM_ROWS = 16  # ... until the experts average this many routed rows (decode)
GATHER_PAIRS_PER_EXPERT = 2  # compiled decode: gather-and-reduce up to this many pairs
GATHER_EXPERTS_MAX_BYTES = 8 << 20  # "gathered": above this, copying expert weights costs more
DISPATCH = ("auto", "dense", "grouped", "gathered", "sorted")


class RoutingStats:
    """Filled by one forward: tokens per expert of each MoE layer that ran (in call order,
    which is `Transformer.moe_layers()` order), and, when asked for, the sequence-wise
    balance loss of each."""

    def __init__(self, balance: bool = False):
        self.balance = balance
        self.counted: torch.Tensor | None = None  # [N] bool: the tokens `counts` counts
        self.counts: list[torch.Tensor] = []
        self.balance_losses: list[torch.Tensor] = []


@dataclass
class FoldedFFN:
    """A feed-forward's weights for decode (x @ w), the preceding norm's weight folded in
    (or kept in `norm` where the weights are used in place)."""

    w13: torch.Tensor | None  # [d, ...]: MLP [w1 | w3]; dense MoE [gate? | experts' w1|w3]
    w2: torch.Tensor | None  # [..., d]
    dispatch: str = ""  # MoE: dense | grouped | gathered | sorted
    fused_gate: bool = False  # dense: the gate's logits are w13's first E columns
    gate: torch.Tensor | None = None  # [d, E] fp32
    norm: torch.Tensor | None = None  # ffn_norm weight, when not folded
    n_shared: int = 0  # dense: shared experts, as experts E..E+n_shared-1
    experts_kernel: tuple | None = None  # routed experts for the kernels: quant.py


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter, bias=False)
        self.w2 = nn.Linear(inter, dim, bias=False)
        self.w3 = nn.Linear(dim, inter, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _amx_runs(x, *self.w2.weight.shape):
            return self._as_one_expert(x)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def _as_one_expert(self, x: torch.Tensor) -> torch.Tensor:
        """The SwiGLU as one expert that every row picks, through experts.cpp on AMX tiles
        (bf16 on CPU): its products as brgemm blocks with the SwiGLU between them, in place of
        three at::mm calls and four elementwise ops: 14-16% off the layer's forward and backward
        on the 128-wide pair's dense twin. So a dense model trains on the same kernel as its
        MoE twin's experts. The output is in x's dtype."""
        rows = x.reshape(-1, x.shape[-1])
        n = len(rows)
        no_routed = torch.empty(n, 0, dtype=torch.long)
        src, slot, sizes = torch.ops.nanoseek.experts_dispatch(no_routed, 0, PAD, 1)
        w13 = torch.cat([self.w1.weight, self.w3.weight])[None]
        w2 = self.w2.weight[None]
        out = _FusedExpertLoop.apply(
            rows,
            rows.new_empty(n, 0),
            w13[:0],
            w2[:0],
            w13,
            w2,
            src,
            slot,
            sizes.tolist(),
            torch.bfloat16,
        )
        return out.view(x.shape)

    @torch.no_grad()
    def fold(self, input_norm: RMSNorm) -> FoldedFFN:
        w13 = torch.cat([self.w1.weight, self.w3.weight]) * input_norm.weight
        return FoldedFFN(w13.t(), self.w2.weight.t())

    def decode(self, f: FoldedFFN, x: torch.Tensor, counts: torch.Tensor | None = None):
        """x [N, d] normed without its weight (folded into w13)."""
        g, u = mm(x, f.w13).chunk(2, dim=-1)
        return mm(F.silu(g) * u, f.w2)


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.n_groups, self.topk_groups = cfg.n_group, cfg.topk_group
        self.route_scale = cfg.routed_scaling_factor
        self.norm_topk = cfg.norm_topk_prob
        self.scoring = cfg.scoring_func
        self.method = cfg.topk_method
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        # selection-only bias: a buffer, moved by the trainer, never by gradients
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts), persistent=True)

    def forward(
        self, x: torch.Tensor, scores_grad: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, d] -> (weights [N, k], expert indices [N, k], scores [N, E]). scores_grad:
        the scores feed a loss (the sequence-wise balance loss), so they need a gradient too."""
        with torch.autocast(x.device.type, enabled=False):  # routing decisions in fp32
            if (
                self.scoring == "sigmoid"
                and not scores_grad
                and torch.is_grad_enabled()
                and (x.requires_grad or self.weight.requires_grad)
                and not torch.compiler.is_compiling()
                and _kernels_run(x)
            ):
                return _SparseGate.apply(x, self.weight, self)
            logits = F.linear(x.float(), self.weight.float())
            return self.route(logits)

    def route(
        self, logits: torch.Tensor, scale: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gate logits [N, E] (fp32) -> (weights [N, k], expert indices [N, k], scores [N, E]).
        scale=False leaves route_scale out of the weights (decode folds it into the experts)."""
        if self.scoring == "sigmoid":
            scores = logits.sigmoid()
            choice = scores + self.bias
        else:
            scores = choice = logits.softmax(dim=-1)
        if self.n_groups > 1 and self.method != "greedy":
            N, E = choice.shape
            grouped = choice.view(N, self.n_groups, E // self.n_groups)
            if self.scoring == "sigmoid":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:  # V2 group_limited_greedy: a group scores its best expert
                group_scores = grouped.amax(dim=-1)
            top = group_scores.topk(self.topk_groups, dim=-1, sorted=False).indices
            # dropped groups get -inf through a broadcast add: fewer ops than a bool mask
            drop = torch.full_like(group_scores, float("-inf")).scatter_(1, top, 0.0)
            choice = (grouped + drop[:, :, None]).view(N, E)
        indices = _top_k(choice, self.top_k)
        weights = scores.gather(1, indices)
        if self.norm_topk:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if scale and self.route_scale != 1.0:
            weights = weights * self.route_scale
        return weights, indices, scores


class _SparseGate(torch.autograd.Function):
    """Gate.forward with sigmoid scores, its backward in experts.cpp's `gate_bwd`: only each
    token's k chosen scores carry a gradient (the bias only selects), where autograd scatters
    them into an [N, E] gradient and runs two fp32 matmuls and five elementwise passes over
    it. The forward is Gate.route's, the same bits; the gradients differ from autograd's in
    the order of their fp32 sums. The gate's forward and backward on 8,192 rows, 32 experts,
    width 128, one thread: 5.8 -> 4.0 ms (an AMX Xeon)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, gate: Gate):
        xf = x.float()
        weights, indices, scores = gate.route(F.linear(xf, weight.float()))
        ctx.save_for_backward(xf, weight, indices, scores.gather(1, indices))
        ctx.x_dtype, ctx.scale, ctx.norm = x.dtype, gate.route_scale, gate.norm_topk
        ctx.mark_non_differentiable(indices, scores)
        return weights, indices, scores

    @staticmethod
    def backward(ctx, dweights: torch.Tensor, *_):
        xf, weight, indices, chosen = ctx.saved_tensors
        dx, dw = torch.ops.nanoseek.gate_bwd(
            xf, weight.float(), indices, chosen, dweights.float(), ctx.scale, ctx.norm
        )
        return dx.to(ctx.x_dtype), dw.to(weight.dtype), None


def _top_k(choice: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of each row's k largest values: experts.cpp's `topk_rows` on CPU in
    eager fp32 (1.0 ms against torch.topk's 2.6 for 4 of 32 on 8,192 rows, one thread),
    torch.topk elsewhere. The same experts, listed in another order (largest first)."""
    if choice.dtype == torch.float32 and not torch.compiler.is_compiling() and _kernels_run(choice):
        return torch.ops.nanoseek.topk_rows(choice, k)
    return choice.topk(k, dim=-1, sorted=False).indices


def _padded_slots(counts: torch.Tensor, rows: torch.Tensor, pairs: int) -> torch.Tensor:
    """The row of each (token, expert) pair sorted by expert when expert e's block has
    rows[e] >= counts[e] rows: its pairs first, then padding."""
    shift = (rows.cumsum(0) - rows) - (counts.cumsum(0) - counts)
    steps = shift.repeat_interleave(counts, output_size=pairs)
    return torch.arange(pairs, device=counts.device) + steps


def _blocks(sizes: list[int]):
    """(expert, its rows' slice) for every expert with rows."""
    start = 0
    for e, n in enumerate(sizes):
        if n:
            yield e, slice(start, start + n)
        start += n


class _ExpertLoop(torch.autograd.Function):
    """Every routed expert once on its block of rows (pairs sorted by expert), as one autograd
    node whose backward loops over the experts too. Against one node per op: each expert's
    weight gradients are written into the [E, ...] gradients in place (autograd would stack
    32 per-expert tensors, and concatenate the gate/up and per-expert splits: ~15 ms a layer
    on 2 threads), and every elementwise step runs on one expert's rows while they are in
    cache. Rows go back to their tokens with index_add_ (x[src]'s own backward, an
    index_put with accumulate, runs 5x slower)."""

    @staticmethod
    def forward(ctx, x, row_weights, w13, w2, src, sizes: list[int]):
        """x [N, d]; w13 [E, 2I, d]; w2 [E, d, I] as stored (cast to x's dtype here, their
        gradients returned in their own); src [R]: the token each row reads, in blocks of
        sizes[e] rows for expert e; row_weights [R]: each row's gate weight (0 on padding
        rows) -> [N, d]."""
        ctx.weight_dtype = w13.dtype
        w13, w2 = w13.to(x.dtype), w2.to(x.dtype)
        with torch.autocast(x.device.type, enabled=False):  # the caller cast the rest
            xs = x.index_select(0, src)
            hs = x.new_empty(len(src), w13.shape[1])
            ys = x.new_empty(len(src), x.shape[1])
            for e, rows in _blocks(sizes):
                gate, up = torch.mm(xs[rows], w13[e].t(), out=hs[rows]).chunk(2, dim=-1)
                torch.mm(F.silu(gate) * up, w2[e].t(), out=ys[rows])
            out = torch.zeros_like(x).index_add_(0, src, ys * row_weights[:, None])
        ctx.save_for_backward(xs, hs, ys, row_weights, w13, w2, src)
        ctx.sizes = sizes
        return out

    @staticmethod
    def backward(ctx, dout):
        xs, hs, ys, row_weights, w13, w2, src = ctx.saved_tensors
        need_x, need_rw, need_w13, need_w2 = ctx.needs_input_grad[:4]
        with torch.autocast(dout.device.type, enabled=False):
            dys = dout.index_select(0, src)
            drw = (dys * ys).sum(1) if need_rw else None
            dys.mul_(row_weights[:, None])
            dw13 = torch.empty_like(w13) if need_w13 else None
            dw2 = torch.empty_like(w2) if need_w2 else None
            for e, n in enumerate(ctx.sizes):  # experts without rows: zero gradient
                if n == 0:
                    for dw in (dw13, dw2):
                        if dw is not None:
                            dw[e].zero_()
            dxs = torch.empty_like(xs) if need_x else None
            for e, rows in _blocks(ctx.sizes):
                gate, up = hs[rows].chunk(2, dim=-1)
                act = F.silu(gate)
                dy = dys[rows]
                if need_w2:
                    torch.mm(dy.t(), act * up, out=dw2[e])
                da = torch.mm(dy, w2[e])
                dh = torch.empty_like(hs[rows])
                dgate, dup = dh.chunk(2, dim=-1)
                torch.ops.aten.silu_backward.grad_input(da * up, gate, grad_input=dgate)
                torch.mul(da, act, out=dup)
                if need_w13:
                    torch.mm(dh.t(), xs[rows], out=dw13[e])
                if need_x:
                    torch.mm(dh, w13[e], out=dxs[rows])
            dx = torch.zeros_like(dout).index_add_(0, src, dxs) if need_x else None
        dw13, dw2 = (None if g is None else g.to(ctx.weight_dtype) for g in (dw13, dw2))
        return dx, drw, dw13, dw2, None, None


class _FusedExpertLoop(torch.autograd.Function):
    """`_ExpertLoop`'s math in C++ (nanoseek/kernels/experts.cpp; fp32 or bf16 on CPU): the
    same per-expert matmuls, with the SwiGLU and the gate weight fused into one pass between
    them in the forward and one in the backward, and no Python per expert. fp32: ~12% off a
    `small` MoE layer's forward + backward, 3-9% off the step; bf16: 1-5% off the step. The
    rows go out and come back in C++ too (`experts_dispatch`'s counting sort, each expert's
    rows gathered just before its first product, a per-token fp32 sum in place of
    index_add_'s scatter) and the shared experts run as more experts: with the gate's
    `topk_rows`, 14% off the 128-wide bf16 layer (AMX Xeon, one thread). Equal to
    `_ExpertLoop` to ~1e-6 in fp32, within rounding in bf16 (tests/test_kernels.py)."""

    @staticmethod
    def forward(ctx, x, weights, w13, w2, shared_w13, shared_w2, src, slot, sizes, dtype):
        """x [N, d] in any float dtype; weights [N, k] each token's gate weights; the shared
        experts' weights shaped as the routed ones' ([s, 2I, d], [s, d, I]; or None); src,
        slot, sizes from `experts_dispatch`; the experts run in `dtype` -> [N, d] in x's dtype,
        the shared experts' output included. The kernel converts each expert's weight
        gradients to the weights' dtype while they are in cache (in bf16 from fp32 weights,
        autograd's cast of the whole [E, 2I, d] gradient afterwards cost ~2% of a `small`
        step)."""
        ctx.weight_dtype, ctx.weights_shape = w13.dtype, weights.shape
        # on AMX tiles the kernel rounds fp32 weights to bf16 as it packs each expert (the
        # same bits as this cast, without a pass over every weight); elsewhere cast here
        if not (dtype == torch.bfloat16 and torch.ops.nanoseek.experts_amx(*w2.shape[1:])):
            w13, w2 = w13.to(dtype), w2.to(dtype)
            if shared_w13 is not None:
                shared_w13, shared_w2 = shared_w13.to(dtype), shared_w2.to(dtype)
        shared = (shared_w13, shared_w2)
        with torch.autocast(x.device.type, enabled=False):
            out, xs, h, a, rw = torch.ops.nanoseek.experts_fwd(
                x, weights, w13, w2, *shared, src, slot, sizes, dtype
            )
        ctx.save_for_backward(xs, h, a, rw, w13, w2, *shared, src, slot)
        ctx.sizes = sizes
        return out

    @staticmethod
    def backward(ctx, dout):
        saved = (
            ctx.saved_tensors
        )  # xs, h, a, rw, w13, w2, shared w13, w2, src, slot: the op's order
        k = ctx.weights_shape[1]
        with torch.autocast(dout.device.type, enabled=False):
            dx, dweights, dw13, dw2, dsw13, dsw2 = torch.ops.nanoseek.experts_bwd(
                dout, *saved, k, ctx.sizes, ctx.weight_dtype
            )
        if saved[6] is None:  # no shared experts
            dsw13 = dsw2 = None
        return dx, dweights.view(ctx.weights_shape), dw13, dw2, dsw13, dsw2, None, None, None, None


# NANOSEEK_EXPERT_KERNEL=0 keeps CPU training on the Python loop (benchmarks flip this)
EXPERT_KERNEL = os.environ.get("NANOSEEK_EXPERT_KERNEL", "1") != "0"
# F.grouped_mm is public from torch 2.10; torch._grouped_mm (CUDA only) before it
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
# CUDA training in bf16 runs the experts as grouped GEMMs (`Experts.grouped`) where torch has
# them; False keeps the per-expert loop with its host sync (benchmarks.device_check compares)
GPU_GROUPED = _GROUPED_MM is not None


@functools.cache
def _has_grouped_gemm(device: torch.device) -> bool:
    """CUDA's grouped GEMM needs compute capability 8.0 or newer (Ampere on)."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


@functools.cache
def expert_kernel_builds() -> bool:
    """Whether experts.cpp builds and loads here (once a process; a warning if not)."""
    return builds(experts_library, "the experts train through the Python loop instead")


def _expert_loop(x: torch.Tensor, dtype: torch.dtype) -> type[torch.autograd.Function]:
    """The C++ loop for fp32 and bf16 where `_kernels_run`, else the Python one."""
    if dtype in (torch.float32, torch.bfloat16) and _kernels_run(x):
        return _FusedExpertLoop
    return _ExpertLoop


def _kernels_run(x: torch.Tensor) -> bool:
    """Whether experts.cpp's ops run on x: on CPU, not turned off, outside a dispatch mode
    (torch's FlopCounterMode, fake tensors: they must see what the ops would hide), built."""
    return (
        EXPERT_KERNEL
        and x.device.type == "cpu"
        and not is_in_torch_dispatch_mode()
        and expert_kernel_builds()
    )


def _amx_runs(x: torch.Tensor, d: int, inter: int) -> bool:
    """Whether an MLP on x (width d, inner width inter) runs on experts.cpp's AMX tiles:
    bf16 compute on a CPU with AMX, eagerly, where `_kernels_run`."""
    return (
        _compute_dtype(x) == torch.bfloat16
        and not torch.compiler.is_compiling()
        and _kernels_run(x)
        and torch.ops.nanoseek.experts_amx(d, inter)
    )


def _eager_under_compile(fn):
    """torch.compiler.disable(fn), but without importing torch._dynamo (~3 s at start-up)
    in a process that never compiles: if dynamo is not loaded, nothing is compiling."""
    disabled = []

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return call


@torch.library.custom_op("nanoseek::grouped_mm", mutates_args=())
def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """F.grouped_mm as an op torch.compile does not look into: its meta function accepts
    only bf16 (the CUDA kernel's rule) while the CPU kernel runs any dtype. Forward: a [M, K]
    rows grouped by `offs`, b [E, K, N] -> [M, N]; backward uses the [K, M] x [M, N] form."""
    return _GROUPED_MM(a, b, offs=offs)


@grouped_mm.register_fake
def _(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if b.dim() == 3:
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[-1])


def _grouped_mm_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, grad):
    a, b, offs = ctx.saved_tensors
    da = grouped_mm(grad, b.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
    db = grouped_mm(a.t(), grad, offs) if ctx.needs_input_grad[1] else None
    return da, db, None


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


class _Permute(torch.autograd.Function):
    """x's rows in the order `index` (a permutation). The backward gathers with `inverse`:
    x[index]'s own backward is a scatter-add, which runs on one thread."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def count_tokens(
    indices: torch.Tensor, n_experts: int, counted: torch.Tensor | None = None
) -> torch.Tensor:
    """Tokens per expert [n_experts] (int64) from `indices` [N, k]; `counted` [N] bool leaves
    tokens out. bincount with a fixed output shape, so torch.compile traces it."""
    flat = indices.flatten()
    ones = torch.ones_like(flat) if counted is None else counted[:, None].expand_as(indices)
    return flat.new_zeros(n_experts).scatter_add_(0, flat, ones.flatten().long())


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    t = x.device.type
    return torch.get_autocast_dtype(t) if torch.is_autocast_enabled(t) else x.dtype


class Experts(nn.Module):
    """All routed experts' weights stacked: w13 = [gate; up] per expert, w2 = down."""

    def __init__(self, n_experts: int, dim: int, inter: int):
        super().__init__()
        self.inter = inter
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * inter, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter))

    def forward(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        indices: torch.Tensor,
        counts: torch.Tensor | None = None,
        shared: MLP | None = None,
    ) -> torch.Tensor:
        """x [N, d]; each token goes to its k experts (`indices` [N, k], gate `weights`
        [N, k]), `counts` [E] tokens per expert -> [N, d], plus `shared(x)` when the shared
        experts are given (the C++ loop runs them as experts too). On CPU, eager: `sorted`; under
        torch.compile in fp32: `grouped`, which the compiler traces whole (no host sync, no
        shape that changes per step) and fuses the elementwise work around. On CUDA in bf16:
        `grouped` (one grouped GEMM kernel per product, no host sync) where
        `GPU_GROUPED` allows it and the GPU has the kernel (compute capability 8.0+)."""
        # bf16 on CPU stays on `sorted` (a graph break per layer): CPU grouped_mm runs one
        # oneDNN matmul per expert, and oneDNN builds a kernel for every new bf16 shape (16 ms
        # a call on `small`; the whole compiled step 1.45x slower than eager; now even)
        dt, device = _compute_dtype(x), x.device.type
        if (
            device == "cuda"
            and dt == torch.bfloat16
            and GPU_GROUPED
            and _has_grouped_gemm(x.device)
        ) or (device == "cpu" and torch.compiler.is_compiling() and dt == torch.float32):
            out = self.grouped(x, weights, indices, counts)
            return out if shared is None else out + shared(x)
        return self.sorted(x, weights, indices, counts, shared)

    def grouped(self, x, weights, indices, counts=None) -> torch.Tensor:
        """Tokens sorted by expert, every expert's two matmuls as one `grouped_mm` each."""
        N, k = indices.shape
        d, dt = x.shape[1], _compute_dtype(x)
        if counts is None:
            counts = count_tokens(indices, self.w13.shape[0])
        order = indices.flatten().argsort(stable=True)
        inverse = order.argsort()
        offs = counts.cumsum(0).to(torch.int32)
        copies = x.to(dt)[:, None].expand(N, k, d).reshape(N * k, d)  # token-major
        h = grouped_mm(_Permute.apply(copies, order, inverse), self.w13.to(dt).mT, offs)
        gate, up = h.chunk(2, dim=-1)
        y = grouped_mm(F.silu(gate) * up, self.w2.to(dt).mT, offs)
        y = _Permute.apply(y, inverse, order).view(N, k, d)  # back to token-major
        return (y * weights.to(dt)[:, :, None]).sum(1).to(x.dtype)

    @_eager_under_compile  # the block sizes change every step: one recompile each
    def sorted(self, x, weights, indices, counts=None, shared=None) -> torch.Tensor:
        """Pairs sorted by expert and every expert run once on its contiguous block of rows
        (a loop over experts, never over tokens: `_ExpertLoop`, or its C++ form in fp32 or
        bf16 on CPU, which sorts, gathers and sums the rows in C++ too). The fastest eager
        path on CPU."""
        N, k = indices.shape
        dt = _compute_dtype(x)
        # In reduced precision each block is padded to a multiple of PAD rows: oneDNN builds
        # a kernel for every new bf16 matmul shape, which costs more than the multiply when
        # shapes change every step. fp32 matmuls (MKL) have no such cost: no padding.
        pad = dt != torch.float32
        loop = _expert_loop(x, dt)
        if loop is _FusedExpertLoop:  # the sort, gather and sum in C++ too
            shared_w13, shared_w2 = self._as_experts(shared)
            n_shared = 0 if shared_w13 is None else len(shared_w13)
            src, slot, rows = torch.ops.nanoseek.experts_dispatch(
                indices, self.w13.shape[0], PAD if pad else 1, n_shared
            )
            out = loop.apply(
                x, weights, self.w13, self.w2, shared_w13, shared_w2, src, slot, rows.tolist(), dt
            )
            return out if shared is None or shared_w13 is not None else out + shared(x)
        if counts is None:
            counts = count_tokens(indices, self.w13.shape[0])
        order = indices.flatten().argsort(stable=True)
        rows = (counts + PAD - 1) // PAD * PAD if pad else counts
        sizes = rows.tolist()  # the layer's one host sync
        row_weights = weights.flatten()[order].to(dt)
        src = order // k
        if pad:  # padding rows read token 0 with weight 0
            slot = _padded_slots(counts, rows, N * k)
            src = src.new_zeros(sum(sizes)).index_copy_(0, slot, src)
            row_weights = row_weights.new_zeros(len(src)).index_copy(0, slot, row_weights)
        # the loop casts the weights once (not per expert under autocast)
        out = loop.apply(x.to(dt), row_weights, self.w13, self.w2, src, sizes).to(x.dtype)
        return out if shared is None else out + shared(x)

    def _as_experts(self, shared: MLP | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The shared experts' MLP as s more experts shaped as these ([s, 2I, d], [s, d, I]):
        a SwiGLU of width s * I is the sum of s SwiGLUs of width I. (None, None) without it,
        or when its width is not a multiple of I."""
        if shared is None or shared.w1.weight.shape[0] % self.inter:
            return None, None
        (width, d), inter = shared.w1.weight.shape, self.inter
        s = width // inter
        w13 = torch.cat([shared.w1.weight.view(s, inter, d), shared.w3.weight.view(s, inter, d)], 1)
        return w13, shared.w2.weight.view(d, s, inter).transpose(0, 1).contiguous()


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared = (
            MLP(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size)
            if cfg.n_shared_experts > 0
            else None
        )

    def forward(self, x: torch.Tensor, stats: RoutingStats | None = None) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, indices, scores = self.gate(flat, scores_grad=stats is not None and stats.balance)
        counts = count_tokens(indices, self.n_experts)  # the load, and the Python loop's dispatch
        if stats is not None:
            if stats.counted is not None:  # the load: real tokens only
                stats.counts.append(count_tokens(indices, self.n_experts, stats.counted))
            else:
                stats.counts.append(counts)
            if stats.balance:
                stats.balance_losses.append(self._sequence_balance_loss(scores, indices, shape))
        return self.experts(flat, weights, indices, counts, self.shared).view(shape)

    def _sequence_balance_loss(self, scores, indices, shape) -> torch.Tensor:
        """DeepSeek-V3's sequence-wise loss: sum_i f_i P_i per sequence, averaged over the batch."""
        B, T = shape[0], shape[1]
        E, k = self.n_experts, self.top_k
        chosen = torch.zeros(B * T, E, device=scores.device).scatter_(1, indices, 1.0)
        f = chosen.view(B, T, E).sum(1) * E / (k * T)
        p = (scores / scores.sum(-1, keepdim=True)).view(B, T, E).mean(1)
        return (f * p).sum(-1).mean()

    # --- the decode form -----------------------------------------------------------------
    @torch.no_grad()
    def fold(self, input_norm: RMSNorm, dispatch: str = "auto") -> FoldedFFN:
        ex, sh, g = self.experts, self.shared, input_norm.weight
        E, I, d = ex.w13.shape[0], ex.inter, ex.w13.shape[2]
        gate = self.gate.weight.float()
        if dispatch == "auto":
            small = ex.w13.nbytes + ex.w2.nbytes <= DENSE_EXPERTS_MAX_BYTES
            cpu_grouped = ex.w13.device.type == "cpu" and hasattr(F, "grouped_mm")
            dispatch = "dense" if small else "grouped" if cpu_grouped else "gathered"
        if dispatch not in DISPATCH[1:]:
            raise ValueError(f"unknown MoE dispatch {dispatch!r}; use one of {', '.join(DISPATCH)}")
        if dispatch == "dense":
            # every expert as one wide matmul; the shared expert as n_shared more experts;
            # route_scale folded into the routed experts' down projection
            w13 = [ex.w13]
            w2 = [ex.w2.permute(0, 2, 1).reshape(E * I, d) * self.gate.route_scale]
            if sh is not None:
                w13.append(torch.cat([sh.w1.weight.view(-1, I, d), sh.w3.weight.view(-1, I, d)], 1))
                w2.append(sh.w2.weight.t())
            w13 = torch.cat(w13).flatten(0, 1) * g  # [(E + ns) * 2I, d]
            fused = w13.dtype == torch.float32  # the gate runs in fp32: fuse only then
            if fused:
                w13 = torch.cat([gate * g, w13])
            n_shared = sh.w1.weight.shape[0] // I if sh is not None else 0
            # norm kept too: a large batch runs the experts in place instead (decode)
            return FoldedFFN(w13.t(), torch.cat(w2), "dense", fused, (gate * g).t(), g, n_shared)
        w13 = torch.cat([sh.w1.weight, sh.w3.weight]).t() if sh is not None else None
        w2 = sh.w2.weight.t() if sh is not None else None
        return FoldedFFN(w13, w2, dispatch, gate=gate.t(), norm=g)

    def decode(
        self, f: FoldedFFN, x: torch.Tensor, counts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [N, d] normed without its weight. `counts` [E], when given, accumulates the
        tokens routed to each expert (a server's expert-load metric)."""
        N, E = x.shape[0], self.n_experts
        if f.dispatch == "dense" and N * self.gate.top_k >= GROUPED_FROM_ROWS * E:
            # many tokens (a prefill, RL rollouts): computing every expert for every token
            # costs more than grouping the chosen ones (8 experts, top-2: 1.25x at 128 tokens)
            if not torch.compiler.is_compiling() and hasattr(F, "grouped_mm"):
                return self._grouped_in_place(f, x, counts)
        if f.dispatch == "dense":
            I = self.experts.inter
            if f.fused_gate:
                logits, h = (x @ f.w13).split([E, f.w13.shape[1] - E], dim=-1)
            else:
                logits, h = x.float() @ f.gate, x @ f.w13
            weights, idx, _ = self.gate.route(logits, scale=False)
            # per-expert weights: 0 for experts not chosen, 1 for the shared ones
            dense = logits.new_zeros(N, E).scatter_(1, idx, weights)
            dense = F.pad(dense, (0, f.n_shared), value=1.0).to(x.dtype)
            g, u = h.view(N, -1, 2, I).unbind(2)
            out = (F.silu(g) * u * dense[:, :, None]).view(N, -1) @ f.w2
        else:
            x = x * f.norm
            weights, idx, _ = self.gate.route(x.float() @ f.gate)
            few = idx.numel() <= GATHER_PAIRS_PER_EXPERT * self.n_experts
            kernel = f.experts_kernel
            if kernel is not None and few:
                # the kernels read each chosen expert in place, once for all its rows
                out = experts_mm(x, weights.to(x.dtype), idx, kernel)
            elif f.dispatch != "sorted" and torch.compiler.is_compiling():
                out = self._compiled(x, weights, idx)
            elif f.dispatch == "grouped":
                out = self._grouped(x, weights, idx)
            elif f.dispatch == "gathered":
                out = self._gathered(x, weights, idx)
            else:
                out = self.experts(x, weights, idx)
            if f.w13 is not None:
                g, u = mm(x, f.w13).chunk(2, dim=-1)
                out = out + mm(F.silu(g) * u, f.w2)
        if counts is not None:
            counts += count_tokens(idx, self.n_experts)
        return out

    def _compiled(self, x, weights, idx) -> torch.Tensor:
        """The experts under torch.compile (the engine's `compile=True`). Up to two (token,
        expert) pairs per expert (batch 1-16 of `small`): each pair's expert read in place by
        one fused gather-and-reduce per projection, with no weight copy and none of the
        per-expert loop grouped_mm runs on CPU (an expert chosen twice is read twice, still
        1.25x faster than grouped_mm at batch 8 and 1.13x at 16; even at 32); more pairs:
        `_grouped`."""
        if idx.numel() > GATHER_PAIRS_PER_EXPERT * self.n_experts:
            return self._grouped(x, weights, idx)
        ex = self.experts
        h = (ex.w13[idx] * x[:, None, None, :]).sum(-1)  # [N, k, 2I]: inductor fuses the gather
        g, u = h.chunk(2, dim=-1)
        y = (ex.w2[idx] * (F.silu(g) * u)[:, :, None, :]).sum(-1)  # [N, k, d]
        return (y * weights.to(y.dtype)[..., None]).sum(1)

    def _grouped_in_place(
        self, f: FoldedFFN, x: torch.Tensor, counts: torch.Tensor | None
    ) -> torch.Tensor:
        """A dense-folded layer's grouped form: the experts' own weights, the norm applied
        to x (f.gate has it folded in), route_scale in the routing weights."""
        weights, idx, _ = self.gate.route(x.float() @ f.gate)
        x = x * f.norm
        out = self._grouped(x, weights, idx)
        if self.shared is not None:
            out = out + self.shared(x)
        if counts is not None:
            counts += count_tokens(idx, self.n_experts)
        return out

    def _grouped(self, x, weights, idx) -> torch.Tensor:
        ex = self.experts
        N, k = idx.shape
        sorted_e, order = idx.view(-1).sort()
        bounds = torch.arange(self.n_experts, device=x.device)
        offs = torch.searchsorted(sorted_e, bounds, right=True, out_int32=True)
        # under compile, the custom op: F.grouped_mm's meta function takes bf16 only
        mm = grouped_mm if torch.compiler.is_compiling() else F.grouped_mm
        h = mm(x[order // k], ex.w13.transpose(1, 2), offs=offs)  # [N*k, 2I]
        g, u = h.chunk(2, dim=-1)
        y = mm(F.silu(g) * u, ex.w2.transpose(1, 2), offs=offs)  # [N*k, d]
        y = torch.empty_like(y).index_copy_(0, order, y)  # back to token-major order
        return torch.bmm(weights.to(y.dtype).view(N, 1, k), y.view(N, k, -1)).view(N, -1)

    def _gathered(self, x, weights, idx) -> torch.Tensor:
        ex = self.experts
        if idx.numel() * (ex.w13[0].nbytes + ex.w2[0].nbytes) > GATHER_EXPERTS_MAX_BYTES:
            return ex(x, weights, idx)
        N, k = idx.shape  # few tokens: each token's k experts as one batched matmul, no sync
        sel = idx.view(-1)
        w13 = ex.w13.index_select(0, sel)  # [N*k, 2I, d]
        gu = torch.bmm(w13.view(N, -1, w13.shape[-1]), x[:, :, None])  # [N, k*2I, 1]
        g, u = gu.view(N * k, -1).chunk(2, dim=-1)
        y = torch.bmm(ex.w2.index_select(0, sel), (F.silu(g) * u)[:, :, None])
        return torch.bmm(weights.to(y.dtype).view(N, 1, k), y.view(N, k, -1)).view(N, -1)
