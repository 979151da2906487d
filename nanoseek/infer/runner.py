"""ModelRunner: drives the model's cached forms over the latent cache, for prefill, decode
and verify steps. It owns what an engine owns: which cache rows a batch reads and writes,
positions, the causal mask, and the choice of path; the math (absorbed MLA, folded norms,
MoE dispatch) belongs to the model (`Transformer.fold` / `decode`).

Two paths over the same cache and weights:
- absorbed (default): `Transformer.decode` over weights folded once by `Transformer.fold`;
  call `refresh()` after the weights change (RL updates the model the engine samples from).
- plain: the model's own forward (`Transformer.forward(kv=...)`), which re-expands keys
  and values from the latents: the reference the fast path is tested against.

`compile=True` runs the absorbed decode and verify steps (T <= MAX_COMPILED_T positions)
through torch.compile: a step of `small` is ~500 eager op calls at batch 1, inductor makes
it a few fused C++ kernels, called from a C++ wrapper on CPU. The context length S is a
dynamic dimension (one graph for every S); prefills stay eager (their lengths vary, and
they are one call per request).
"""

from __future__ import annotations

import torch

from nanoseek.infer.cache import KVCache
from nanoseek.kernels import available as kernels_available
from nanoseek.model.attention import DecodeStep
from nanoseek.model.moe import MoE
from nanoseek.model.quant import F32_KERNEL_MIN_BYTES, kernel_folded, mm
from nanoseek.model.transformer import Transformer

MAX_COMPILED_T = 16  # positions per row in a compiled step: a decode step 1, a verify step 2-16


class ModelRunner:
    def __init__(
        self,
        model: Transformer,
        cache: KVCache,
        dispatch: str = "auto",
        track_expert_load: bool = False,
        compile: bool = False,
        quantize: str | None = None,
        kernels: bool | None = None,
    ):
        """`dispatch`: how MoE layers send tokens to experts when decoding (see
        nanoseek.model.moe: auto, dense, grouped, gathered, sorted). `track_expert_load`:
        count the tokens each expert receives (`expert_counts`), for a server's metrics.
        `compile`: decode and verify steps through torch.compile (see above). `quantize`:
        "int8" runs the weights every token reads in int8 (nanoseek.model.quant). `kernels`
        (fp32 models on the CPU): True runs the small matmuls in nanoseek's fp32 kernel
        (the caller checked that it builds), False in MKL, None (auto) in the kernel where it
        builds and the model has at least F32_KERNEL_MIN_BYTES of weights."""
        self.model, self.cache, self.dispatch = model, cache, dispatch
        self.quantize = quantize
        if kernels is None:
            p = list(model.parameters())
            fp32_cpu = p[0].device.type == "cpu" and p[0].dtype == torch.float32
            large = sum(t.nbytes for t in p) >= F32_KERNEL_MIN_BYTES
            kernels = fp32_cpu and large and kernels_available()
        self.kernels = quantize is not None or kernels
        self._step = self._mtp_step = None
        if compile:
            # dynamo keeps at most recompile_limit graphs per function, counted across all
            # runners (one per batch size and step kind each); past it, steps run eagerly
            dynamo = torch._dynamo.config
            dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
            # CPU: inductor's C++ wrapper calls the step's ~80 kernels and ~30 extern ops
            # from C++ instead of Python (1.03-1.12x at batch 1-8; benchmarks/decode.py)
            cpu = next(model.parameters()).device.type == "cpu"
            opts = {"cpp_wrapper": True} if cpu else None
            self._step = torch.compile(self._decode, dynamic=None, options=opts)
            self._mtp_step = torch.compile(self._mtp_decode, dynamic=None, options=opts)
        cfg = model.config
        self.heads = cfg.num_attention_heads
        n_moe = sum(isinstance(b.ffn, MoE) for b in model.layers)
        dev = next(model.parameters()).device
        self.expert_counts = (
            torch.zeros(n_moe, cfg.n_routed_experts, dtype=torch.long, device=dev)
            if track_expert_load and n_moe
            else None
        )
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-fold the weights; call after the model's weights change (e.g. an RL update)."""
        cache, dev = self.cache, next(self.model.parameters()).device
        P = cache.rows_per_slot
        self.folded = self.model.fold(P, self.dispatch, mtp=cache.mtp_latent is not None)
        dtype = self.folded.head.dtype
        if self.kernels:
            m = self.model
            experts = [_experts(b) for b in m.layers]
            mtp_experts = [_experts(x.block) for x in m.mtp]
            self.folded = kernel_folded(self.folded, experts, mtp_experts, self.quantize)
        self.arange = torch.arange(P, device=dev)
        self.row_base = torch.arange(cache.slots, device=dev) * P
        self.neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=dev)
        self.zero = torch.tensor(0.0, dtype=dtype, device=dev)
        self.rows, self.mtp_rows = cache.rows(), cache.rows(mtp=True)
        self.index_rows, self.mtp_index_rows = cache.rows(index=True), cache.rows(True, True)

    @torch.inference_mode()  # as forward's: a compiled step sees the same kind of tensors
    def prepare(self, pos: torch.Tensor, start: int = 0, S: int | None = None) -> DecodeStep:
        """The per-step inputs every layer shares, for pos [B, T] in cache rows
        start..start+B; S = max(pos) + 1 (pass it when known, to skip a host read).
        A verify step builds it once for the model and the MTP module."""
        B, T = pos.shape
        if S is None:
            S = int(pos.max()) + 1
        mask = None
        if B > 1 or T > 1:  # one query at S - 1 sees every key: no mask needed
            # key s is visible to the query at position p iff s <= p (also hides stale rows)
            mask = torch.where(self.arange[:S] > pos[:, :, None], self.neg_inf, self.zero)
            if T > 1:
                H = self.heads
                mask = mask[:, None].expand(B, H, T, S).reshape(B, H * T, S)
        cs = self.folded.rope[pos]  # [B, T, 2, 1, R]
        ck = cs.view(B * T, 2, -1)
        rows = (self.row_base[start : start + B, None] + pos).view(-1)
        span = self.arange[:S]
        return DecodeStep(
            B, T, start, span, mask, cs[:, :, 0], cs[:, :, 1], ck[:, 0], ck[:, 1], rows, pos
        )

    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        start: int,
        S: int | None = None,
        plain: bool = False,
        step: DecodeStep | None = None,
        lens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ids, pos [B, T] for cache rows start..start+B -> final-norm hidden [B, T, d].
        S (optional) = max(pos) + 1; step (optional): prepare(pos, start, S), built by the caller.
        `lens` (a prefill's real tokens per row) is V4Runner's; the latent cache needs none:
        pads write rows past each sequence, rewritten before any query reads them."""
        B = ids.shape[0]
        if plain:
            S = int(pos.max()) + 1
            kv = [self.cache.layer_kv(i, start, B, S) for i in range(len(self.model.layers))]
            return self.model(ids, kv=kv, positions=pos).hidden
        st = step or self.prepare(pos, start, S)
        if self._step is not None and st.T <= MAX_COMPILED_T:
            _dynamic_context(st)
            return self._step(ids, st)
        return self._decode(ids, st)

    def _decode(self, ids, st: DecodeStep) -> torch.Tensor:
        m = self.model
        return m.decode(self.folded, ids, st, self.rows, self.expert_counts, self.index_rows)

    def _mtp_decode(self, h, next_ids, st: DecodeStep) -> torch.Tensor:
        m = self.model
        return m.mtp_decode(self.folded, h, next_ids, st, self.mtp_rows, self.mtp_index_rows)

    @torch.inference_mode()
    def mtp_forward(
        self,
        h: torch.Tensor,
        next_ids: torch.Tensor,
        pos: torch.Tensor,
        start: int,
        S: int | None = None,
        plain: bool = False,
        step: DecodeStep | None = None,
        eager: bool = False,
    ) -> torch.Tensor:
        """MTP module 1 at positions pos [B, T], reading the main model's final-norm hidden
        h [B, T, d] and the token after each position: its normed output [B, T, d].
        `eager`: not through the compiled step, whatever T."""
        m, B = self.model, h.shape[0]
        if plain:
            mod = m.mtp[0]
            kv = self.cache.layer_kv(0, start, B, int(pos.max()) + 1, mtp=True)
            cos, sin = m.rope(pos)
            return mod.norm(mod(h, m.embed(next_ids), cos, sin, kv=kv, positions=pos))
        st = step or self.prepare(pos, start, S)
        if self._mtp_step is not None and st.T <= MAX_COMPILED_T and not eager:
            _dynamic_context(st)
            return self._mtp_step(h, next_ids, st)
        return self._mtp_decode(h, next_ids, st)

    @torch.inference_mode()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return mm(h, self.folded.head)


def _experts(block) -> torch.nn.Module | None:
    return block.ffn.experts if isinstance(block.ffn, MoE) else None


def _dynamic_context(st: DecodeStep) -> None:
    """Mark the context length S dynamic in every tensor that has it (the step's span, the
    mask), so that the first compile makes one graph for all S, not one per S and then a
    second, dynamic one."""
    from torch._dynamo import maybe_mark_dynamic

    maybe_mark_dynamic(st.span, 0)
    if st.mask is not None:
        maybe_mark_dynamic(st.mask, 2)
