"""The latent KV cache: per layer and token, only kv_norm(c_kv) and the rotated k_rope.

One preallocated buffer per layer group, [layers, slots, max_len, kv_lora_rank + rope]:
the cache unit is the latent row (the `c_kv | k_rope` pair side by side, so absorbed
attention reads keys and values from one tensor). A running sequence owns a slot. Slots in
use are kept contiguous (0..n-1): when a sequence leaves, the one in the last slot moves
into the hole, so a decode step reads `buf[:, :n]` as a view and never gathers rows.
"""

from __future__ import annotations

import torch

from nanoseek.config import ModelConfig
from nanoseek.model.attention import LayerKV


class KVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        slots: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
        mtp_layers: int = 0,
    ):
        self.slots, self.max_len = slots, max_len
        self.rank, self.rope = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        width = self.rank + self.rope
        # +1 row: a speculative verify step writes one position past the last token
        shape = (slots, max_len + 1, width)
        self.latent = torch.zeros(cfg.num_hidden_layers, *shape, dtype=dtype, device=device)
        self.mtp_latent = (
            torch.zeros(mtp_layers, *shape, dtype=dtype, device=device) if mtp_layers else None
        )
        self.used = 0  # slots 0..used-1 hold running sequences

    # --- slots -------------------------------------------------------------------------
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
        moves into it. Returns True when a move happened (the caller re-labels that sequence)."""
        last = self.used - 1
        self.used -= 1
        if slot == last:
            return False
        n = length_of_last
        for buf in (self.latent, self.mtp_latent):
            if buf is not None:
                buf[:, slot, :n] = buf[:, last, :n]
        return True

    # --- views -------------------------------------------------------------------------
    def layer(self, i: int, start: int, B: int, mtp: bool = False) -> torch.Tensor:
        """Rows start..start+B of layer i: [B, max_len + 1, rank + rope] (a view)."""
        buf = self.mtp_latent if mtp else self.latent
        return buf[i, start : start + B]

    def layer_kv(self, i: int, start: int, B: int, length: int, mtp: bool = False) -> LayerKV:
        """The same rows as the model's LayerKV (for the plain reference path)."""
        buf = (self.mtp_latent if mtp else self.latent)[i]
        slots = torch.arange(start, start + B, device=buf.device)
        return LayerKV(buf[..., : self.rank], buf[..., self.rank :], slots, length)

    # --- accounting --------------------------------------------------------------------
    def bytes_per_token(self) -> int:
        """Bytes the main model's cache holds per token slot, read off the tensor itself."""
        return self.latent.nbytes // (self.latent.shape[1] * self.latent.shape[2])

    def nbytes(self) -> int:
        return self.latent.nbytes + (0 if self.mtp_latent is None else self.mtp_latent.nbytes)
