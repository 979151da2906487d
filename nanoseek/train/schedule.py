"""Learning-rate schedules as pure functions of the step and the run's progress in [0, 1],
so a resumed run recomputes exactly the LR the uninterrupted one would have used."""

from __future__ import annotations

import math


def lr_at(step: int, progress: float, peak: float, warmup_steps: int, schedule: str,
          min_ratio: float = 0.1, decay_frac: float = 0.2) -> float:  # fmt: skip
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    p = min(max(progress, 0.0), 1.0)
    floor = peak * min_ratio
    if schedule == "wsd":  # warmup-stable-decay: flat, then linear to the floor at the end
        start = 1.0 - decay_frac
        return peak if p < start else peak + (floor - peak) * (p - start) / decay_frac
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * p))  # cosine
