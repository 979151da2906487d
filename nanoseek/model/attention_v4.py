"""DeepSeek-V4 attention, piece by piece: the stateless, full-sequence forms, and beside
them the cached forms the engine decodes with (`V4LayerKV`, infer/cache_v4.py).

V4 attention is shared-KV multi-query attention: one `head_dim` (512) vector per token is
both key and value for every head, over a sliding window of recent tokens plus, in most
layers, *compressed* entries that summarise the distant past:

- **Compressor.** Every `rate` tokens become one entry: each token proposes a value
  `kv_proj(x)` and per-channel gate logits `gate_proj(x) + position_bias[pos in window]`;
  the entry is the gate-softmax-weighted sum over the window (per channel), RMS-normed,
  with RoPE at the window's first position. HCA (heavily compressed attention) uses
  rate 128 and attends to all entries; CSA (compressed sparse attention) uses rate 4 with
  *overlapping* windows -- each token projects twice (Ca | Cb), and entry w pools window
  w's Cb with window w-1's Ca -- and a lightning `V4Indexer` picks `index_topk` entries per
  query. An entry may be read only by queries past its window's end (`causal_bias`).
- **Attention sinks.** A learned per-head logit `sinks[h]` joins the softmax as one more
  column and is then dropped: a head can put weight "nowhere" instead of being forced to
  spread it over the keys (`sink_attention`).
- **Interleaved partial RoPE on the tail** (`rope_tail`): RoPE rotates pairs of the last
  `rope_dim` channels. Since values are keys, the output's rope channels are rotated back
  by the query's position (`rope_tail(out, cos, -sin)`), leaving relative positions.
- **Query blocks.** The full-sequence forms (no cache, and a cached prefill) go
  `QUERY_BLOCK` queries at a time (`V4Attention.blocks`): a block reads its own tokens and
  the `sliding_window - 1` before them, then the entries -- HCA's all, causally masked;
  CSA's all, masked to each query's top-k, or past `GATHER_OVER` x k entries each query's
  k gathered as its own keys (`picked_entries`) -- in the same softmax, sink included, as
  the dense form: one [S, S + T] masked logits tensor (GBs at 8K tokens; it stays the
  reference in tests/test_v4_long.py). The indexer scores a block at a time too.
- **Grouped output projection** (`GroupedLinear`): heads x head_dim is huge (32768 for
  V4-Flash), so heads are split into `o_groups` groups, each projected on its own to
  `o_lora_rank` (`o_a_proj`), then mixed by one linear (`o_b_proj`) to the hidden size.

Parameter names are transformers' DeepseekV4 (`self_attn.compressor.{kv_proj, gate_proj,
position_bias, kv_norm}`, `self_attn.compressor.indexer.{..., q_b_proj,
scorer.weights_proj}`, `self_attn.o_a_proj`, `self_attn.sinks`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import V4_LAYER_RATIOS
from nanoseek.model.hyper import rms_normalize
from nanoseek.model.indexer import kl_to_scores
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import cos_sin, inv_frequencies

# Queries per block in the full-sequence forms: each block reads only the keys its window
# can reach, so nothing [S, S]- or [S, T]-sized is built (the indexer's [S, T] scores go a
# block at a time too). small-v4 on one thread, 8K tokens: 128 and 256 alike, 64 and 512
# 4% and 12% slower (smaller blocks: more calls; larger: more keys outside the window).
QUERY_BLOCK = 256
# CSA's queries gather their top-k entries as their own keys once there are more than
# GATHER_OVER x k entries; up to that, a [Q, T] mask over all of them is faster (small-v4,
# one CSA layer: gathering 1.4x slower at T = 4k, even at 8k, 2.1x faster at 32k)
GATHER_OVER = 8


def query_blocks(S: int) -> list[slice]:
    """0..S in consecutive blocks of QUERY_BLOCK queries."""
    return [slice(lo, min(lo + QUERY_BLOCK, S)) for lo in range(0, S, QUERY_BLOCK)]


def rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of the last 2 * cos.shape[-1]
    channels of x (in float32); the leading channels pass. cos / sin [..., S, r/2] must
    broadcast against x [..., S, D] (give heads a dimension of 1)."""
    r = 2 * cos.shape[-1]
    pairs = x[..., -r:].float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    rot = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    return torch.cat([x[..., :-r], rot.to(x.dtype)], dim=-1)


class GroupedLinear(nn.Module):
    """Block-diagonal linear (transformers' DeepseekV4GroupedLinear, V4's `o_a_proj`):
    x [..., g, in_per_group] -> [..., g, out_features / g], group i by its own matrix.
    weight [out_features, in_per_group]: the g matrices stacked by rows."""

    def __init__(self, in_per_group: int, out_features: int, n_groups: int):
        super().__init__()
        self.n_groups = n_groups
        self.weight = nn.Parameter(torch.empty(out_features, in_per_group))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.view(self.n_groups, -1, self.weight.shape[1])  # [g, out/g, in]
        return torch.einsum("...gi,goi->...go", x, w)


def sink_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    mask: torch.Tensor | None,
    sinks: torch.Tensor,
    scale: float,
    picked: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Shared-KV attention with a per-head sink (transformers' eager_attention_forward):
    q [B, H, S, D], kv [B, 1, T, D] (key and value), mask additive, broadcast to
    [B, H, S, T], sinks [H] -> out [B, S, H, D]. The sink is one more softmax column whose
    probability is dropped, so a head's weights over the keys may sum to less than 1.
    `picked` (kv [B, S, k, D], mask [B, 1, S, k]): keys of each query's own after kv's,
    in the same softmax (CSA's chosen entries, `picked_entries`)."""
    probs = sink_probs(q, kv, mask, sinks, scale, picked)
    T = kv.shape[2]
    out = probs[..., :T].to(kv.dtype) @ kv  # [B, H, S, D]
    if picked is not None:  # per query: [B, S, H, k] @ [B, S, k, D]
        own = probs[..., T:].transpose(1, 2).to(kv.dtype) @ picked[0]
        return out.transpose(1, 2) + own
    return out.transpose(1, 2)


def sink_probs(
    q: torch.Tensor,
    kv: torch.Tensor,
    mask: torch.Tensor | None,
    sinks: torch.Tensor,
    scale: float,
    picked: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """sink_attention's weights over the keys, [B, H, S, T (+ k)] (the sink's column
    dropped; the picked keys' columns after kv's)."""
    logits = (q @ kv.transpose(-1, -2)) * scale
    if mask is not None:
        logits = logits + mask.to(logits.dtype)
    B, H, S, _ = logits.shape
    sink = sinks.to(logits.dtype).view(1, H, 1, 1).expand(B, H, S, 1)
    if picked is not None:
        pkv, pmask = picked
        own = (q.transpose(1, 2) @ pkv.transpose(-1, -2)).transpose(1, 2)  # [B, H, S, k]
        logits = torch.cat([logits, own * scale + pmask.to(logits.dtype), sink], dim=-1)
    else:
        logits = torch.cat([logits, sink], dim=-1)
    return torch.softmax(logits - logits.amax(dim=-1, keepdim=True), dim=-1)[..., :-1]


def causal_bias(position_ids: torch.Tensor, n_entries: int, rate: int) -> torch.Tensor:
    """[B, 1, S, T] additive mask over compressed entries: the query at position t reads
    entry w only when its whole window has passed, w < (t + 1) // rate."""
    visible = (position_ids + 1) // rate  # [B, S]
    entries = torch.arange(n_entries, device=position_ids.device)
    blocked = entries.view(1, 1, -1) >= visible.unsqueeze(-1)
    bias = torch.zeros(blocked.shape, device=position_ids.device)
    return bias.masked_fill(blocked, float("-inf")).unsqueeze(1)


@dataclass
class V4Step:
    """What every layer of one cached step shares (the engine's runner builds it). A step
    is a prefill of chunks that start at position 0 (`lens` [B]: each row's real tokens;
    the rest is right padding, whose keys and entries no real query reads and which decode
    rewrites before any query can) or a decode of one token per row (`lens` None).

    pos [B, T]; S = max(pos) + 1; ring_src / ring_dst [B, K]: the step's tokens (chunk
    rows) that go to the sliding window's ring, and the ring rows they go to;
    window_mask [B, 1, 1, W] (decode): additive, 0 on the ring rows inside each query's
    window (the runner reads the positions the rows hold)."""

    pos: torch.Tensor
    S: int
    lens: torch.Tensor | None
    ring_src: torch.Tensor
    ring_dst: torch.Tensor
    window_mask: torch.Tensor | None = None


@dataclass
class CompressorKV:
    """One compressor's cache for a batch of sequences (views into the engine's cache):
    `entries` [B, E, d], entry w pooling window w; the window being filled, `kv` / `gate`
    [B, rate, width] (row = position % rate, gate without the position bias); with
    overlapping windows (CSA) `prev_kv` / `prev_gate` [B, rate, d], the previous window's
    Ca half, which the current window's entry pools too."""

    entries: torch.Tensor
    kv: torch.Tensor
    gate: torch.Tensor
    prev_kv: torch.Tensor | None = None
    prev_gate: torch.Tensor | None = None


@dataclass
class V4LayerKV:
    """One layer's cache for a batch of sequences: the sliding window's ring [B, W, hd]
    (row = position % W), the compressor's and (CSA) the indexer's state, and the step."""

    step: V4Step
    window: torch.Tensor
    compressor: CompressorKV | None = None
    indexer: CompressorKV | None = None


class Compressor(nn.Module):
    """One compressed KV entry per `rate` tokens (transformers' DeepseekV4HCACompressor
    with `overlap=False`, DeepseekV4CSACompressor's compression with `overlap=True`),
    stateless: windows after the last complete one are dropped (`cached` is the form over
    a cache, which keeps the window being filled). A CSA compressor owns
    the layer's `V4Indexer` (as transformers' does), which it does not call itself.

    forward(x [B, S, D]) -> entries [B, S // rate, head_dim], RoPE'd at each window's
    first position (`inv_freq`: the "compress" rope, theta 160000 with YaRN in V4).
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        rate: int,
        rope_dim: int,
        rope_theta: float = 160000.0,
        rope_scaling: dict[str, Any] | None = None,
        overlap: bool = False,
        norm_eps: float = 1e-6,
        indexer: V4Indexer | None = None,
    ):
        super().__init__()
        self.head_dim, self.rate, self.overlap = head_dim, rate, overlap
        width = 2 * head_dim if overlap else head_dim  # overlap: [Ca | Cb] per token
        self.kv_proj = nn.Linear(hidden_size, width, bias=False)
        self.gate_proj = nn.Linear(hidden_size, width, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(rate, width))
        self.kv_norm = RMSNorm(head_dim, norm_eps)
        # a plain fp32 CPU tensor, not a buffer: model.to(bfloat16) must not round the
        # frequencies, nor a model built on the meta device lose them (cos_sin moves it)
        self.inv_freq = inv_frequencies(rope_dim, rope_theta, rope_scaling)
        if indexer is not None:  # CSA: `compressor.indexer` in checkpoints
            self.indexer = indexer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.compress(x)

    def compress(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        n, r = S // self.rate, self.rate
        if n == 0:
            return x.new_zeros(B, 0, self.head_dim)
        kv, gate = self.project(x[:, : n * r])
        windows = torch.arange(n, device=x.device).expand(B, n)
        return self.pool(kv.view(B, n, r, -1), gate.view(B, n, r, -1), windows, x.dtype)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's proposal and gate logits [B, S, width] (no position bias yet)."""
        return self.kv_proj(x), self.gate_proj(x)

    def pool(
        self,
        kv: torch.Tensor,
        gate: torch.Tensor,
        windows: torch.Tensor,
        dtype: torch.dtype,
        prev_kv: torch.Tensor | None = None,
        prev_gate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Whole windows' entries: kv, gate [B, n, rate, width] (row j = the token at j in
        its window), windows [B, n] their ids -> [B, n, d], RoPE'd at each window's first
        position (cos / sin in `dtype`). Overlap: window w also pools window w-1's Ca half,
        `prev_kv` / `prev_gate` [B, n, rate, d] when given (a cache's), else the previous
        window of the same tensor; window 0 has no predecessor (weight 0)."""
        d = self.head_dim
        gate = gate + self.position_bias
        if self.overlap:  # window w pools its own Cb and window w-1's Ca over 2r slots
            if prev_kv is None:
                prev_kv = F.pad(kv[:, :-1, :, :d], (0, 0, 0, 0, 1, 0))  # window 0: none
                prev_gate = F.pad(gate[:, :-1, :, :d], (0, 0, 0, 0, 1, 0), value=float("-inf"))
            else:
                first = (windows == 0)[..., None, None]
                prev_gate = (prev_gate + self.position_bias[:, :d]).masked_fill(
                    first, float("-inf")
                )
            kv = torch.cat([prev_kv, kv[..., d:]], dim=2)
            gate = torch.cat([prev_gate, gate[..., d:]], dim=2)
        weights = gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)
        entries = self.kv_norm((kv * weights).sum(dim=2))
        cos, sin = cos_sin(windows * self.rate, self.inv_freq)
        return rope_tail(entries, cos.to(dtype), sin.to(dtype))

    def cached(self, x: torch.Tensor, c: CompressorKV, step: V4Step) -> torch.Tensor:
        """`compress` over a cache: the step's tokens join their windows in `c`, each entry
        is pooled once its window is whole (what `compress` gives on the whole sequence),
        and the entries any query of the step may read come back, [B, S // rate, d] (the
        causal masks say which of them each query sees)."""
        B, T, _ = x.shape
        r, d = self.rate, self.head_dim
        rows = torch.arange(B, device=x.device)[:, None]
        kv, gate = self.project(x)
        if step.lens is None:  # decode: one token per row, at position t
            t = step.pos
            c.kv[rows, t % r], c.gate[rows, t % r] = kv, gate
            prev = (c.prev_kv[:, None], c.prev_gate[:, None]) if self.overlap else ()
            # pooled every step: while the window is incomplete its entry is invisible (the
            # queries' masks) and the window's last token rewrites it
            entry = self.pool(c.kv[:, None], c.gate[:, None], t // r, x.dtype, *prev)
            c.entries[rows, t // r] = entry
            if self.overlap:  # a window just completed: its Ca half is the next one's prev
                done = ((t + 1) % r == 0)[..., None]
                c.prev_kv.copy_(torch.where(done, c.kv[..., :d], c.prev_kv))
                c.prev_gate.copy_(torch.where(done, c.gate[..., :d], c.prev_gate))
        else:  # prefill from position 0: the whole windows, then the window being filled
            n = T // r
            if n:
                windows = torch.arange(n, device=x.device).expand(B, n)
                whole = (kv[:, : n * r].view(B, n, r, -1), gate[:, : n * r].view(B, n, r, -1))
                c.entries[:, :n] = self.pool(*whole, windows, x.dtype)
            cur = (step.lens // r * r)[:, None] + torch.arange(r, device=x.device)  # [B, r]
            src = cur.clamp(max=T - 1)  # rows past a row's end: rewritten before they count
            c.kv.copy_(kv[rows, src])
            c.gate.copy_(gate[rows, src])
            if self.overlap:  # window 0's prev is masked by `pool`
                prev = (cur - r).clamp(min=0)
                c.prev_kv.copy_(kv[rows, prev, :d])
                c.prev_gate.copy_(gate[rows, prev, :d])
        return c.entries[:, : step.S // r]


class IndexerScorer(nn.Module):
    """index score(t, s) = sum_h w_{t,h} * relu(q_{t,h} . k_s) (DeepseekV4IndexerScorer)."""

    def __init__(self, hidden_size: int, n_heads: int, head_dim: int):
        super().__init__()
        self.softmax_scale, self.weights_scaling = head_dim**-0.5, n_heads**-0.5
        self.weights_proj = nn.Linear(hidden_size, n_heads, bias=False)

    def forward(self, q: torch.Tensor, keys: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """q [B, S, H, d], keys [B, T, d] (every query's) or [B, S, T, d] (each query's
        own), x [B, S, D] -> scores [B, S, T] (fp32)."""
        B, S, H, _ = q.shape
        k = keys.float().transpose(-1, -2)
        if keys.dim() == 3:  # shared keys: one matmul for every query and head
            scores = (q.float().flatten(1, 2) @ k).view(B, S, H, -1)
        else:
            scores = q.float() @ k
        # both scales on the [B, S, H] weights and ReLU in place: at long context the
        # passes over [B, S, H, T] are the indexer's cost (relu_: the matmul's own output)
        weights = self.weights_proj(x).float() * (self.weights_scaling * self.softmax_scale)
        return torch.einsum("bsht,bsh->bst", scores.relu_(), weights)


class V4Indexer(Compressor):
    """CSA's lightning indexer (transformers' DeepseekV4Indexer), stateless unless given a
    cache (its keys then come from `Compressor.cached`): its own small overlapping
    compressor (`index_head_dim`) gives index keys; queries come from the attention's
    normed q-LoRA latent (`q_b_proj`), roped at their positions with the same "compress"
    rope. forward -> top-k entry ids [B, S, k] per query, -1 where fewer than
    k entries are visible yet."""

    def __init__(
        self,
        hidden_size: int,
        q_lora_rank: int,
        n_heads: int,
        head_dim: int,
        topk: int,
        rate: int,
        rope_dim: int,
        rope_theta: float = 160000.0,
        rope_scaling: dict[str, Any] | None = None,
        norm_eps: float = 1e-6,
    ):
        super().__init__(
            hidden_size, head_dim, rate, rope_dim, rope_theta, rope_scaling, True, norm_eps
        )
        self.n_heads, self.topk = n_heads, topk
        self.q_b_proj = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.scorer = IndexerScorer(hidden_size, n_heads, head_dim)

    def queries(self, q_latent: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The index queries [B, S, n_heads, d], roped at their positions."""
        B, S, _ = q_latent.shape
        q = self.q_b_proj(q_latent).view(B, S, self.n_heads, self.head_dim)
        cos, sin = cos_sin(position_ids, self.inv_freq)
        return rope_tail(q, cos.unsqueeze(2).to(q.dtype), sin.unsqueeze(2).to(q.dtype))

    def scores(
        self,
        x: torch.Tensor,
        q_latent: torch.Tensor,
        position_ids: torch.Tensor,
        keys: torch.Tensor | None = None,
    ):
        """-> (index scores [B, S, T] with -inf on entries not yet visible, visible [B, S]).
        `keys` [B, T, d]: the index keys (default: `compress(x)`, the whole sequence's)."""
        if keys is None:
            keys = self.compress(x)
        scores = self.scorer(self.queries(q_latent, position_ids), keys, x)
        visible = (position_ids + 1) // self.rate
        blocked = torch.arange(keys.shape[1], device=x.device) >= visible.unsqueeze(-1)
        return scores.masked_fill(blocked, float("-inf")), visible

    def forward(
        self,
        x: torch.Tensor,
        q_latent: torch.Tensor,
        position_ids: torch.Tensor,
        cache: CompressorKV | None = None,
        step: V4Step | None = None,
    ) -> torch.Tensor:
        """With `cache` (and its `step`), the index keys come from the cache (`cached`)."""
        keys = self.compress(x) if cache is None else self.cached(x, cache, step)
        if step is not None and step.lens is None:  # decode: one query a row, anywhere
            return self.select(*self.scores(x, q_latent, position_ids, keys))
        return self.top(x, q_latent, position_ids, keys)

    def top(
        self,
        x: torch.Tensor,
        q_latent: torch.Tensor,
        position_ids: torch.Tensor,
        keys: torch.Tensor,
    ) -> torch.Tensor:
        """`select` over `scores` with index keys [B, T, d], a block of queries at a time:
        the scores are [S, T] and their ReLU'd heads [S, n_heads, T], too big to hold whole
        at long context (GBs at 8K tokens) and faster in cache-sized blocks. Every block
        scores all T entries, not just those before its end: top-k breaks ties (index
        scores of exactly 0, common with few index heads) by the row's length, so a
        shorter row could choose other entries than the dense form's."""
        tops = [
            self.select(*self.scores(x[:, b], q_latent[:, b], position_ids[:, b], keys))
            for b in query_blocks(x.shape[1])
        ]
        return torch.cat(tops, dim=1)

    def select(self, scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """The top-k entry ids [B, S, k] of `scores`, -1 past each query's visible entries."""
        top = scores.topk(min(self.topk, scores.shape[-1]), dim=-1).indices
        return torch.where(top >= visible.unsqueeze(-1), -1, top)


def selected_bias(top_k: torch.Tensor, n_entries: int) -> torch.Tensor:
    """[B, 1, S, T] additive mask: 0 on the entries the indexer chose (ids >= 0), -inf
    elsewhere (CSA's per-query block bias)."""
    B, S, _ = top_k.shape
    ids = torch.where(top_k >= 0, top_k, n_entries)  # -1 -> a spare column, cut off below
    bias = torch.full((B, S, n_entries + 1), float("-inf"), device=top_k.device)
    return bias.scatter_(-1, ids, 0.0)[..., :n_entries].unsqueeze(1)


def picked_entries(entries: torch.Tensor, top_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's chosen entries as its own keys (sink_attention's `picked`): entries
    [B, T, d], top_k [B, S, k] -> (kv [B, S, k, d], additive mask [B, 1, S, k], -inf on
    ids -1). The same attention as `selected_bias` over all T entries, in k columns, not T."""
    B, T, d = entries.shape
    rows = torch.arange(B, device=top_k.device)[:, None, None] * T
    ids = (rows + top_k.clamp(min=0)).flatten()  # rows of entries [B * T, d]
    # index_select: a row gather, twice as fast as advanced indexing on CPU
    kv = entries.flatten(0, 1).index_select(0, ids).view(*top_k.shape, d)
    mask = torch.zeros(top_k.shape, device=top_k.device).masked_fill(top_k < 0, float("-inf"))
    return kv, mask.unsqueeze(1)


def sliding_bias(
    position_ids: torch.Tensor, window: int, key_positions: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, 1, S, K] additive causal mask over the sequence's own tokens: the query at
    position t reads keys at t - window < position <= t. Keys at `key_positions` [B, K]
    (default: the queries' own)."""
    q = position_ids.unsqueeze(-1)
    k = (position_ids if key_positions is None else key_positions).unsqueeze(-2)
    allowed = (k <= q) & (k > q - window)
    bias = torch.zeros(allowed.shape, device=position_ids.device)
    return bias.masked_fill(~allowed, float("-inf")).unsqueeze(1)


class V4Attention(nn.Module):
    """One V4 attention layer (transformers' DeepseekV4Attention): full-sequence and
    stateless, or one cached step when given a `V4LayerKV`. `layer_type` is transformers' name: "sliding_attention" (window only),
    "compressed_sparse_attention" (CSA, rate 4, indexer), "heavily_compressed_attention"
    (HCA, rate 128); `compress_rate` overrides the rate.

    Queries: `x -> q_a_proj -> q_a_norm` (the latent the indexer also reads) `-> q_b_proj`,
    per head RMS-normed without a weight. The one KV head: `x -> kv_proj -> kv_norm`. Both
    roped on their last `rope_dim` channels: the plain "main" rope (theta 10000) in
    sliding-only layers, the "compress" rope (compress_rope_theta, YaRN) where a compressor
    runs. Keys are the window's tokens then the compressed entries; softmax with a sink per
    head; the output's rope channels rotated back; grouped output projection.
    """

    def __init__(
        self,
        hidden_size: int,
        n_heads: int,
        head_dim: int = 512,
        rope_dim: int = 64,
        q_lora_rank: int = 1024,
        o_groups: int = 8,
        o_lora_rank: int = 1024,
        sliding_window: int = 128,
        layer_type: str = "sliding_attention",
        compress_rate: int | None = None,
        rope_theta: float = 10000.0,
        compress_rope_theta: float = 160000.0,
        rope_scaling: dict[str, Any] | None = None,
        index_n_heads: int = 64,
        index_head_dim: int = 128,
        index_topk: int = 512,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.n_heads, self.head_dim, self.window = n_heads, head_dim, sliding_window
        self.o_groups, self.norm_eps, self.scale = o_groups, norm_eps, head_dim**-0.5
        self.q_a_proj = nn.Linear(hidden_size, q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(q_lora_rank, norm_eps)
        self.q_b_proj = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.kv_proj = nn.Linear(hidden_size, head_dim, bias=False)
        self.kv_norm = RMSNorm(head_dim, norm_eps)
        in_per_group = n_heads * head_dim // o_groups
        self.o_a_proj = GroupedLinear(in_per_group, o_groups * o_lora_rank, o_groups)
        self.o_b_proj = nn.Linear(o_groups * o_lora_rank, hidden_size, bias=False)
        self.sinks = nn.Parameter(torch.zeros(n_heads))
        if layer_type not in V4_LAYER_RATIOS:
            raise ValueError(f"V4 layer_type {layer_type!r} is not one of {list(V4_LAYER_RATIOS)}")
        compress_rate = compress_rate or V4_LAYER_RATIOS[layer_type]
        self.compressor: Compressor | None = None
        if layer_type != "sliding_attention":
            rope = (rope_dim, compress_rope_theta, rope_scaling)
            indexer = None
            if layer_type == "compressed_sparse_attention":  # sparse: the indexer chooses
                indexer = V4Indexer(
                    hidden_size, q_lora_rank, index_n_heads, index_head_dim, index_topk,
                    compress_rate, *rope, norm_eps,
                )  # fmt: skip
            self.compressor = Compressor(
                hidden_size, head_dim, compress_rate, *rope, indexer is not None, norm_eps, indexer
            )
            inv_freq = inv_frequencies(*rope)
        else:
            inv_freq = inv_frequencies(rope_dim, rope_theta)
        self.inv_freq = inv_freq  # plain fp32 tensor, as in Compressor

    @property
    def indexer(self) -> V4Indexer | None:
        """CSA's lightning indexer (it lives in the compressor, as in checkpoints)."""
        return getattr(self.compressor, "indexer", None)

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor, cache: V4LayerKV | None = None
    ) -> torch.Tensor:
        """x [B, S, D], position_ids [B, S] (the sequence from its start) -> [B, S, D].
        With `cache`, x is one step's tokens and the keys come from (and go to) the cache."""
        B, S, _ = x.shape
        q, q_latent, cos, sin = self.queries(x, position_ids)
        kv, window_mask = self.token_keys(x, cos, sin), None
        if cache is not None:
            kv, window_mask = self.window_keys(kv, cache)
        entries, top = self.entries(x, q_latent, position_ids, cache)
        outs = []
        for b, kv_b, mask, picked in self.blocks(kv, entries, top, position_ids, window_mask):
            outs.append(sink_attention(q[:, :, b], kv_b, mask, self.sinks, self.scale, picked))
        out = torch.cat(outs, dim=1)  # [B, S, H, hd]
        out = rope_tail(out, cos.transpose(1, 2), -sin.transpose(1, 2))
        out = self.o_a_proj(out.reshape(B, S, self.o_groups, -1)).flatten(2)
        return self.o_b_proj(out)

    def queries(self, x: torch.Tensor, position_ids: torch.Tensor):
        """-> (q [B, H, S, hd] normed and roped, q_latent [B, S, q_lora_rank] (what the
        indexer reads), cos, sin [B, 1, S, r/2])."""
        B, S, _ = x.shape
        cos, sin = cos_sin(position_ids, self.inv_freq)
        cos, sin = cos.to(x.dtype).unsqueeze(1), sin.to(x.dtype).unsqueeze(1)  # [B, 1, S, r/2]
        q_latent = self.q_a_norm(self.q_a_proj(x))
        q = self.q_b_proj(q_latent).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        return rope_tail(rms_normalize(q, self.norm_eps), cos, sin), q_latent, cos, sin

    def token_keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The one KV head: each token's key (and value) [B, 1, S, hd], normed and roped."""
        return rope_tail(self.kv_norm(self.kv_proj(x)).unsqueeze(1), cos, sin)

    def entries(
        self,
        x: torch.Tensor,
        q_latent: torch.Tensor,
        position_ids: torch.Tensor,
        cache: V4LayerKV | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """-> (the compressed entries [B, T, hd], None in window-only layers; CSA's top-k
        entry ids [B, S, k], the indexer's choice, else None). With `cache`: the entries
        the cache holds (`Compressor.cached`), the indexer's keys alike."""
        if self.compressor is None:
            return None, None
        if cache is None:
            entries = self.compressor(x)
        else:
            entries = self.compressor.cached(x, cache.compressor, cache.step)
        top = None
        if self.indexer is not None:
            step = None if cache is None else cache.step
            index = None if cache is None else cache.indexer
            top = self.indexer(x, q_latent, position_ids, index, step)
        return entries, top

    def blocks(
        self,
        kv: torch.Tensor,
        entries: torch.Tensor | None,
        top: torch.Tensor | None,
        position_ids: torch.Tensor,
        window_mask: torch.Tensor | None = None,
        gather: bool | None = None,
    ) -> Iterator[
        tuple[slice, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]
    ]:
        """What each block of queries (`query_blocks`) reads, as sink_attention's arguments:
        yields (the block's slice, keys [B, 1, K, hd], additive mask [B, 1, Q, K], picked).
        The keys: the sequence's that the block's window reaches, then the entries -- all
        of them, masked (HCA: `causal_bias`; CSA: `selected_bias`), or, with `gather`, each
        CSA query's top-k as its own keys (`picked_entries`; by default when there are
        over GATHER_OVER x k entries). kv [B, 1, S, hd]: the sequence's keys, one per
        position (positions count up by one, as the compressor's windows assume), entries
        [B, T, hd], top [B, S, k]. A decode step (`window_mask` [B, 1, 1, W]) is one block
        that reads the window's ring, kv [B, 1, W, hd]."""
        if gather is None:
            gather = top is not None and entries.shape[1] > GATHER_OVER * top.shape[-1]
        S = position_ids.shape[1]
        for b in query_blocks(S) if window_mask is None else [slice(None)]:
            pos = position_ids[:, b]
            if window_mask is None:  # the block's own tokens and the window - 1 before them
                near = slice(max(b.start - self.window + 1, 0), b.stop)
                keys, mask = kv[:, :, near], sliding_bias(pos, self.window, position_ids[:, near])
            else:
                keys, mask = kv, window_mask
            picked = None
            if gather:
                picked = picked_entries(entries, top[:, b])
            elif entries is not None:
                if top is not None:
                    extra = selected_bias(top[:, b], entries.shape[1])
                else:
                    extra = causal_bias(pos, entries.shape[1], self.compressor.rate)
                keys = torch.cat([keys, entries.unsqueeze(1)], dim=2)
                mask = torch.cat([mask, extra], dim=-1)
            yield b, keys, mask, picked

    def window_keys(
        self, kv: torch.Tensor, c: V4LayerKV
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The sliding window over a cache: the step's keys kv [B, 1, T, hd] go into the
        ring; a prefill (from position 0) then reads its own chunk as `forward` does (mask
        None: `blocks` makes the window's), a decode the ring (mask `window_mask`)."""
        st = c.step
        rows = torch.arange(kv.shape[0], device=kv.device)[:, None]
        c.window[rows, st.ring_dst] = kv[:, 0][rows, st.ring_src]
        if st.lens is not None:
            return kv, None
        return c.window.unsqueeze(1), st.window_mask

    def indexer_kl(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor | None:
        """CSA's indexer loss (V3.2's, over compressed entries): the mean per query of
        KL(p || softmax(I)) over the entries the indexer selects, p this attention's weights
        on them (summed over heads, L1-normalised, detached), I the index scores. Pass x
        detached: the gradient then reaches only the indexer, which the LM loss never
        reaches (top-k only chooses). None when no query sees an entry yet."""
        idx = self.indexer
        keys = idx.compress(x)  # the index keys, with gradient: the indexer's compressor
        with torch.no_grad():
            q, q_latent, cos, sin = self.queries(x, position_ids)
            kv, entries = self.token_keys(x, cos, sin), self.compressor(x)
            top = idx.top(x, q_latent, position_ids, keys)  # [B, S, k]
            ps = []  # the attention's weights on each query's chosen entries, heads summed
            for b, kv_b, mask, picked in self.blocks(kv, entries, top, position_ids, gather=True):
                probs = sink_probs(q[:, :, b], kv_b, mask, self.sinks, self.scale, picked)
                ps.append(probs[..., kv_b.shape[2] :].float().sum(1))
            p = torch.cat(ps, dim=1)
            mass = p.sum(-1, keepdim=True)
            p = p / mass.clamp(min=1e-30)
        keep = top >= 0
        rows = keep.any(-1) & (mass[..., 0] > 0)
        if not rows.any():
            return None
        # the loss reads only the chosen entries' scores: score just those, [B, S, k]
        scores = idx.scorer(idx.queries(q_latent, position_ids), picked_entries(keys, top)[0], x)
        return kl_to_scores(p, scores, keep)[rows].mean()
