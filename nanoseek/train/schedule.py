"""Learning-rate schedules as pure functions of the step and the run's progress in [0, 1],
so a resumed run recomputes exactly the LR the uninterrupted one would have used."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    peak: float
    warmup_steps: int = 0
    kind: str = "cosine"  # or "wsd": warmup-stable-decay
    min_ratio: float = 0.1  # the final LR, as a fraction of the peak
    decay_frac: float = 0.2  # wsd: the final fraction of the run that decays
    decay_shape: str = "linear"  # wsd: "linear", or "sqrt": 1 - sqrt(x) of the decay's progress x

    def __call__(self, step: int, progress: float) -> float:
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        p = min(max(progress, 0.0), 1.0)
        floor = self.peak * self.min_ratio
        if self.kind == "wsd":  # flat, then down to the floor at the end
            start = 1.0 - self.decay_frac
            if p < start:
                return self.peak
            x = (p - start) / self.decay_frac
            if self.decay_shape == "sqrt":  # Hägele et al. 2024's (1 - sqrt) cooldown
                x = math.sqrt(x)
            return self.peak + (floor - self.peak) * x
        return floor + (self.peak - floor) * 0.5 * (1.0 + math.cos(math.pi * p))  # cosine
