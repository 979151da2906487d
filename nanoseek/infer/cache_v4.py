"""The DeepSeek-V4 cache: per layer and sequence, the sliding window and the compressed
entries, not a row per token.

V4 attention reads, per layer, the last `sliding_window` tokens' shared-KV vectors and (CSA
and HCA layers) one compressed entry per `rate` tokens. So a slot holds, preallocated from
max_len (`V4Config` names):

- every layer: the window's ring [W, head_dim], row = position % W. `window_pos` [W] says
  which position each row holds (-1: none); one for all layers, which write the same
  positions. A decode step masks rows outside (t - W, t], so absent and stale rows (a
  slot's earlier sequence, right padding) are never read.
- CSA (rate 4) and HCA (rate 128) layers: the entries [max_len // rate + 1, head_dim], and
  the compressor's pending state: the window being filled, each token's kv and gate
  projections [rate, width] (width 2 x head_dim for CSA: its Ca | Cb halves). CSA's
  windows overlap (entry w pools window w's Cb and window w-1's Ca), so it also keeps the
  previous window's Ca half [rate, head_dim] (kv and gate).
- CSA layers: the indexer's keys [max_len // 4 + 1, index_head_dim] and its own
  compressor state, alike.

Per token of context that is head_dim / 4 + index_head_dim / 4 per CSA layer and
head_dim / 128 per HCA layer, plus a constant per slot (the windows and pending windows)
that long contexts amortise; V3 holds kv_lora_rank + rope per layer and token. Slots work
as KVCache's (used ones contiguous, the last moves into a freed one), so the scheduler and
engine treat both alike.
"""

from __future__ import annotations

import dataclasses

import torch

from nanoseek.config import CSA, V4Config
from nanoseek.infer.cache import Slots
from nanoseek.model.attention_v4 import CompressorKV, V4LayerKV, V4Step


def _state(
    slots: int, max_len: int, rate: int, d: int, overlap: bool, dtype, device
) -> CompressorKV:
    """One compressor's buffers for every slot (slot first, as `CompressorKV` for a batch)."""
    width = 2 * d if overlap else d

    def z(*shape: int) -> torch.Tensor:
        return torch.zeros(slots, *shape, dtype=dtype, device=device)

    prev = (z(rate, d), z(rate, d)) if overlap else (None, None)
    return CompressorKV(z(max_len // rate + 1, d), z(rate, width), z(rate, width), *prev)


def _fields(c: CompressorKV) -> list[torch.Tensor | None]:
    return [getattr(c, f.name) for f in dataclasses.fields(c)]


def _tensors(c: CompressorKV | None) -> list[torch.Tensor]:
    return [] if c is None else [t for t in _fields(c) if t is not None]


def _rows(c: CompressorKV | None, start: int, B: int) -> CompressorKV | None:
    """Slots start..start+B of every buffer (views: writes go to the cache)."""
    if c is None:
        return None
    return CompressorKV(*(None if t is None else t[start : start + B] for t in _fields(c)))


class V4Cache(Slots):
    def __init__(
        self,
        cfg: V4Config,
        slots: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        super().__init__(slots)
        self.max_len, self.window_size = max_len, cfg.sliding_window
        W, L = cfg.sliding_window, cfg.num_hidden_layers
        self.window = torch.zeros(L, slots, W, cfg.head_dim, dtype=dtype, device=device)
        self.window_pos = torch.full((slots, W), -1, dtype=torch.long, device=device)
        self.compressor: list[CompressorKV | None] = []
        self.indexer: list[CompressorKV | None] = []
        for rate, kind in zip(cfg.compress_ratios, cfg.layer_types, strict=True):
            csa = kind == CSA
            comp = index = None
            if rate:
                comp = _state(slots, max_len, rate, cfg.head_dim, csa, dtype, device)
            if csa:
                index = _state(slots, max_len, rate, cfg.index_head_dim, True, dtype, device)
            self.compressor.append(comp)
            self.indexer.append(index)

    @property
    def rows_per_slot(self) -> int:
        """Positions a slot's sequence can take (the engine clamps right padding at the
        last); V4 has no speculative draft row."""
        return self.max_len

    def tensors(self) -> list[torch.Tensor]:
        out = [self.window, self.window_pos]
        for c in self.compressor + self.indexer:
            out += _tensors(c)
        return out

    # --- slots -------------------------------------------------------------------------
    def move(self, last: int, slot: int, length_of_last: int) -> None:
        """The last slot's sequence into `slot`: its windows, pending state and entries."""
        self.window[:, slot] = self.window[:, last]
        self.window_pos[slot] = self.window_pos[last]
        for c in self.compressor + self.indexer:
            if c is not None:
                n = length_of_last // c.kv.shape[1] + 1  # up to the window being filled
                c.entries[slot, :n] = c.entries[last, :n]
                for t in _tensors(c)[1:]:  # the pending window (and CSA's previous one)
                    t[slot] = t[last]

    # --- views ---------------------------------------------------------------------------
    def layers(self, start: int, B: int, step: V4Step) -> list[V4LayerKV]:
        """Slots start..start+B of every layer, as the model reads them in one step."""
        return [
            V4LayerKV(
                step, self.window[i, start : start + B], _rows(c, start, B), _rows(x, start, B)
            )
            for i, (c, x) in enumerate(zip(self.compressor, self.indexer, strict=True))
        ]

    def nbytes(self) -> int:
        """Bytes the cache holds, every tensor."""
        return sum(t.nbytes for t in self.tensors())

    def bytes_per_token(self) -> int:
        """Bytes per token of context when every slot holds max_len tokens, read off the
        tensors: the constant per slot (windows, pending windows) amortised over max_len."""
        return self.nbytes() // (self.slots * self.max_len)
