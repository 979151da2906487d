"""Prefix cache: prompts that start like an earlier one reuse its latent rows.

A served chat re-sends its system prompt and every earlier turn with each request. After a
prefill, the prompt's latent rows (every layer's `c_kv | k_rope`, positions 0..n-1) are
copied out of its cache slot and kept here, indexed at every `block`-token boundary, so a
later prompt that shares the first k*block tokens (a system prompt, the earlier turns of the
same chat) copies those rows into its slot and prefills only the rest. Causal attention
makes a position's latent a function of the tokens up to it, so the reused rows are the
rows a cold prefill would write. Least recently used prompts are dropped past
`capacity_tokens`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class _Entry:
    tokens: tuple[int, ...]  # the prompt's first n tokens (n a multiple of block)
    rows: torch.Tensor  # [layers, n, C + R]: their latent rows


class PrefixCache:
    def __init__(self, block: int = 16, capacity_tokens: int = 1 << 16):
        if block < 1 or capacity_tokens < block:
            raise ValueError(f"prefix cache: block {block} must be >= 1 and <= capacity")
        self.block, self.capacity = block, capacity_tokens
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()  # LRU order
        self._index: dict[tuple[int, ...], _Entry] = {}  # every block-aligned prefix -> entry
        self.tokens = 0  # held now
        self.hits = self.lookups = self.reused_tokens = 0

    def lookup(self, ids: list[int]) -> tuple[torch.Tensor, int] | None:
        """The rows of the longest cached block-aligned prefix of `ids` that leaves at least
        one token to prefill (its logits sample the first new token): ([layers, n, C+R], n)."""
        self.lookups += 1
        for n in range((len(ids) - 1) // self.block * self.block, 0, -self.block):
            entry = self._index.get(tuple(ids[:n]))
            if entry is not None:
                self._entries.move_to_end(entry.tokens)
                self.hits += 1
                self.reused_tokens += n
                return entry.rows[:, :n], n
        return None

    def insert(self, ids: list[int], rows: torch.Tensor) -> None:
        """Keep the block-aligned part of a prefilled prompt; rows [layers, >= n, C+R] is a
        view of its slot (copied here)."""
        n = len(ids) // self.block * self.block
        key = tuple(ids[:n])
        if n == 0 or key in self._index:  # already held (as itself or inside a longer one)
            if key in self._index:
                self._entries.move_to_end(self._index[key].tokens)
            return
        entry = _Entry(key, rows[:, :n].clone())
        self._entries[key] = entry
        for k in range(self.block, n + 1, self.block):
            self._index.setdefault(key[:k], entry)
        self.tokens += n
        while self.tokens > self.capacity and len(self._entries) > 1:
            self._evict(next(iter(self._entries)))

    def _evict(self, key: tuple[int, ...]) -> None:
        entry = self._entries.pop(key)
        self.tokens -= len(key)
        for k in range(self.block, len(key) + 1, self.block):
            if self._index.get(key[:k]) is entry:
                del self._index[key[:k]]
                # a shorter prefix another held prompt shares stays reachable through it
                for other in self._entries.values():
                    if other.tokens[:k] == key[:k]:
                        self._index[key[:k]] = other
                        break

    @property
    def nbytes(self) -> int:
        return sum(e.rows.nbytes for e in self._entries.values())
