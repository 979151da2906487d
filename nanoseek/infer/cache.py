"""The latent KV cache: per layer and token, only kv_norm(c_kv) and the rotated k_rope.

One preallocated buffer per layer group, [layers, slots, max_len, kv_lora_rank + rope]
(allocated as rows [layers * slots * max_len, width]: a step writes into that base tensor,
see attention.CacheRows): the cache unit is the latent row (the `c_kv | k_rope` pair side
by side, so absorbed attention reads keys and values from one tensor). A running sequence
owns a slot. Slots in use are kept contiguous (0..n-1): when a sequence leaves, the one in
the last slot moves into the hole, so a decode step reads `buf[:, :n]` as a view and never
gathers rows.
"""

from __future__ import annotations

import torch

from nanoseek.config import ModelConfig
from nanoseek.model.attention import CacheRows, LayerKV


class Slots:
    """Slot bookkeeping shared by the caches: slots 0..used-1 hold running sequences, kept
    contiguous (a cache's `release` moves the last one into the hole)."""

    def __init__(self, slots: int):
        self.slots, self.used = slots, 0

    @property
    def free(self) -> int:
        return self.slots - self.used

    def allocate(self, n: int) -> int:
        """Reserve n contiguous slots; returns the first."""
        if n > self.free:
            raise RuntimeError(f"KV cache has {self.free} free slots, asked for {n}")
        start, self.used = self.used, self.used + n
        return start

    def release(self, slot: int, length_of_last: int) -> bool:
        """Free `slot`; the sequence in the last used slot (holding `length_of_last` tokens)
        moves into it. Returns True when a move happened (the caller re-labels that
        sequence)."""
        last = self.used - 1
        self.used -= 1
        if slot == last:
            return False
        self.move(last, slot, length_of_last)
        return True

    def move(self, last: int, slot: int, length_of_last: int) -> None:
        raise NotImplementedError


class KVCache(Slots):
    def __init__(
        self,
        cfg: ModelConfig,
        slots: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
        mtp_layers: int = 0,
    ):
        super().__init__(slots)
        self.max_len = max_len
        self.rank, self.rope = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        L, P = cfg.num_hidden_layers, self.rows_per_slot
        # (mtp, index) -> CacheRows; latent / mtp_latent / index / mtp_index are 4-D views
        self._rows: dict[tuple[bool, bool], CacheRows] = {}

        def buffer(layers: int, width: int, mtp: bool, index: bool) -> torch.Tensor | None:
            if not layers:
                return None
            rows = torch.zeros(layers * slots * P, width, dtype=dtype, device=device)
            self._rows[mtp, index] = CacheRows(rows, slots, P)
            return rows.view(layers, slots, P, width)

        width = self.rank + self.rope
        self.latent = buffer(L, width, False, False)
        self.mtp_latent = buffer(mtp_layers, width, True, False)
        # V3.2: the lightning indexer's key per layer and token, beside the latent rows
        self.index = self.mtp_index = None
        if cfg.has_indexer:
            self.index = buffer(L, cfg.index_head_dim, False, True)
            self.mtp_index = buffer(mtp_layers, cfg.index_head_dim, True, True)

    @property
    def rows_per_slot(self) -> int:
        """max_len + 1: a speculative verify step writes its draft one position past the
        sequence's last token, so a slot has a row for that too."""
        return self.max_len + 1

    # --- slots -------------------------------------------------------------------------
    def move(self, last: int, slot: int, length_of_last: int) -> None:
        """The last slot's sequence (its tokens and maybe a draft's row) into `slot`."""
        n = min(length_of_last + 1, self.rows_per_slot)
        for buf in (self.latent, self.mtp_latent, self.index, self.mtp_index):
            if buf is not None:
                buf[:, slot, :n] = buf[:, last, :n]

    # --- views -------------------------------------------------------------------------
    def layer_kv(self, i: int, start: int, B: int, length: int, mtp: bool = False) -> LayerKV:
        """Rows start..start+B of layer i as the model's LayerKV (for the plain path)."""
        buf = (self.mtp_latent if mtp else self.latent)[i]
        slots = torch.arange(start, start + B, device=buf.device)
        index = self.mtp_index if mtp else self.index
        index_k = None if index is None else index[i]
        return LayerKV(buf[..., : self.rank], buf[..., self.rank :], slots, length, index_k)

    def slot_rows(self, slot: int, n: int) -> torch.Tensor:
        """The first n rows of a slot, every layer [layers, n, C + R (+ index keys)]: what
        the prefix cache keeps of a prompt."""
        rows = self.latent[:, slot, :n]
        return rows if self.index is None else torch.cat([rows, self.index[:, slot, :n]], -1)

    def put_rows(self, slot: int, rows: torch.Tensor) -> None:
        """Write rows from `slot_rows` back into the first rows of a slot."""
        n, width = rows.shape[1], self.rank + self.rope
        self.latent[:, slot, :n] = rows[..., :width]
        if self.index is not None:
            self.index[:, slot, :n] = rows[..., width:]

    def rows(self, mtp: bool = False, index: bool = False) -> CacheRows | None:
        """The latents (or, `index`, V3.2's indexer keys) of the model's layers (or of the
        MTP module's) as the CacheRows a decode step writes and reads; None when absent."""
        return self._rows.get((mtp, index))

    def nbytes(self) -> int:
        """Bytes the cache holds, every tensor (MTP rows and indexer keys included)."""
        bufs = (self.latent, self.mtp_latent, self.index, self.mtp_index)
        return sum(b.nbytes for b in bufs if b is not None)

    def bytes_per_token(self) -> int:
        """Bytes the main model's cache holds per token slot (V3.2: indexer keys included),
        read off the tensors themselves."""
        slots = self.latent.shape[1] * self.latent.shape[2]
        return (self.latent.nbytes + (0 if self.index is None else self.index.nbytes)) // slots
