"""Sequences and the scheduler: who waits, who runs, which cache slot each one owns.

The running list is kept in slot order with slots 0..n-1, so a decode step is one batch
over the cache's first n rows. Requests join between steps (their prompts are prefilled as
a batch into the next free slots) and leave when they finish (the last sequence moves into
the freed slot). This is all the server needs for continuous batching.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import torch

from nanoseek.infer.cache import KVCache
from nanoseek.infer.sampling import SamplingParams

_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int] = frozenset()
    stream: bool = False  # keep the decoded text up to date for text deltas
    id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_logprob: float | None = None  # of the stop token that ended it (not in output_ids)
    slot: int = -1
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    draft: int | None = None  # the MTP draft for the token after `last_token`
    # speculative engine, steps decoded without drafting: (final-norm hidden, next token)
    # per position whose MTP cache row is not written yet (Engine._catch_up writes them)
    mtp_lag: list[tuple[torch.Tensor, int]] = field(default_factory=list)
    # lookup drafts: token pair -> index of the token after its latest occurrence, for the
    # first `indexed` tokens (lookup)
    follows: dict[tuple[int, int], int] = field(default_factory=dict)
    indexed: int = 0
    generator: torch.Generator | None = None
    text: str = ""  # decoded output (kept up to date only when tracked)
    emitted: int = 0  # characters of `text` already handed out as deltas

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def last_pair(self) -> tuple[int, int]:
        """The last two tokens (the first repeated when there is only one)."""
        tail = self.output_ids[-2:]
        if len(tail) < 2:
            tail = self.prompt_ids[len(tail) - 2 :] + tail
        return tail[0], tail[-1]

    def lookup(self, k: int, draft: int | None = None) -> list[int]:
        """k tokens drafted by prompt lookup: what followed the latest earlier occurrence of
        the last token pair (the last token and the MTP `draft` for the token after it, when
        given), copied on past the end of the text as a repeat of what came since: in a loop
        of p tokens the match lies p back, and the loop's own continuation drafts all k
        (an overlapping copy, as LZ77's). Empty when the pair has not occurred. The pair
        index grows with the sequence, so a call costs O(new tokens + k), not O(length)."""
        P, out = self.prompt_ids, self.output_ids
        n = len(P) + len(out)

        def tok(j: int) -> int:
            return P[j] if j < len(P) else out[j - len(P)]

        # the last pair itself is indexed only once a token follows it: a match is earlier
        for j in range(max(self.indexed, 2), n):
            self.follows[(tok(j - 2), tok(j - 1))] = j
        self.indexed = n
        j = self.follows.get(self.last_pair if draft is None else (self.last_token, draft))
        if j is None:
            return []
        past = [] if draft is None else [draft]  # the text from index n on, as drafted
        for i in range(j, j + k):  # j < n, so past[i - n] is always written already
            past.append(tok(i) if i < n else past[i - n])
        return past[len(past) - k :]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Scheduler:
    def __init__(self, cache: KVCache):
        self.cache = cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # running[i].slot == i

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Move as many waiting sequences as there are free slots into the running batch."""
        n = min(len(self.waiting), self.cache.free)
        if n == 0:
            return []
        start = self.cache.allocate(n)
        new = [self.waiting.popleft() for _ in range(n)]
        for i, seq in enumerate(new):
            seq.slot = start + i
        self.running.extend(new)
        return new

    def finish(self, seq: Sequence) -> None:
        """Free a running sequence's slot, keeping the running slots contiguous."""
        if seq in self.waiting:
            self.waiting.remove(seq)
            return
        last = self.running.pop()
        if last is not seq:
            self.cache.release(seq.slot, last.num_tokens)
            last.slot = seq.slot
            self.running[seq.slot] = last
        else:
            self.cache.release(seq.slot, 0)
        seq.slot = -1

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
