"""V4Runner: drives DeepSeek-V4's cached forward over a V4Cache, for prefill and decode
steps. Like ModelRunner it owns what an engine owns (which slots a batch reads and writes,
positions, the window's mask); the math is the model's own modules (`V4Model.forward` with
a cache: `V4Attention.window_keys`, `Compressor.cached`), so there is one path, tested
against the full-sequence forward (`generate_v4` recomputes it per token).

Two kinds of step, as the engine makes them:
- prefill: right-padded prompts starting at position 0 (`lens` says where each ends); the
  chunk attends to itself as the full forward does, and leaves the last `sliding_window`
  keys, every whole window's entries and the window being filled in the cache;
- decode: one token per sequence, at each one's own position.
No speculation (V4 checkpoints here have no MTP module) and no prefix cache.
"""

from __future__ import annotations

import torch

from nanoseek.infer.cache_v4 import V4Cache
from nanoseek.model.attention_v4 import V4Step
from nanoseek.model.v4 import V4Transformer


class V4Runner:
    def __init__(self, model: V4Transformer, cache: V4Cache, track_expert_load: bool = False):
        """`track_expert_load`: count the tokens each expert of each learned-routing MoE
        layer receives (`expert_counts`; hash-routed layers have fixed tables)."""
        self.model, self.cache = model, cache
        cfg = model.config
        dev = next(model.parameters()).device
        n_moe = len(model.moe_layers())
        self.expert_counts = (
            torch.zeros(n_moe, cfg.n_routed_experts, dtype=torch.long, device=dev)
            if track_expert_load and n_moe
            else None
        )
        self.refresh()

    def refresh(self) -> None:
        """Nothing to re-derive: the cached path reads the model's weights as they are."""
        dev = next(self.model.parameters()).device
        self.ring = torch.arange(self.cache.window_size, device=dev)

    def prepare(
        self, pos: torch.Tensor, start: int, S: int, lens: torch.Tensor | None = None
    ) -> V4Step:
        """The step every layer shares, for pos [B, T] in slots start..start+B; records the
        positions the window's ring rows will hold."""
        B, T = pos.shape
        W, ring_pos = self.cache.window_size, self.cache.window_pos[start : start + B]
        # decode (a one-token prompt too): this sequence wrote every position in (t - W, t],
        # each to row position % W, so rows an earlier sequence left fall outside the mask
        if T == 1:
            dst = pos % W
            ring_pos.scatter_(1, dst, pos)
            seen = (ring_pos >= 0) & (ring_pos <= pos) & (ring_pos > pos - W)
            mask = torch.zeros(seen.shape, device=pos.device).masked_fill(~seen, float("-inf"))
            return V4Step(pos, S, None, torch.zeros_like(dst), dst, mask[:, None, None])
        if lens is None:
            lens = torch.full((B,), T, device=pos.device)
        if bool(pos[:, 0].any()):  # one host read per prefill
            raise ValueError(
                "V4's cached prefill starts every sequence at position 0 (no prefix cache)"
            )
        src = lens[:, None] - W + self.ring  # each row's last W real tokens (< 0: none)
        dst = src % W
        ring_pos.scatter_(1, dst, src.clamp(min=-1))
        return V4Step(pos, S, lens, src.clamp(min=0), dst)

    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        start: int,
        S: int | None = None,
        plain: bool = False,
        step: V4Step | None = None,
        lens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ids, pos [B, T] for slots start..start+B -> final-norm hidden [B, T, d]. A prefill
        (T > 1) starts at position 0, `lens` [B] the real tokens per row (default all);
        T = 1 decodes. S (optional) = max(pos) + 1; step (optional): prepare(...)."""
        if plain:
            raise ValueError("V4 has one cached path; generate_v4 (recompute) is its reference")
        B = ids.shape[0]
        if S is None:
            S = int(pos.max()) + 1
        st = step or self.prepare(pos, start, S, lens)
        counts = [] if self.expert_counts is not None else None
        h = self.model.model(ids, pos, counts, self.cache.layers(start, B, st))
        if counts:
            self.expert_counts += torch.stack(counts)
        return h

    @torch.inference_mode()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(h)
