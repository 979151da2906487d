"""The one timer the benchmarks share."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], repeats: int, warmups: int = 0) -> float:
    """Median wall time of `repeats` calls of fn(), after `warmups` untimed calls."""
    for _ in range(warmups):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved_medians(
    fns: list[Callable[[], object]], rounds: int, warmups: int = 0
) -> list[float]:
    """Median wall time of each fn over `rounds` rounds that call every fn once in turn,
    after `warmups` untimed calls of each: a shared machine's drift falls on all alike."""
    for fn in fns:
        for _ in range(warmups):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, ts in zip(fns, times, strict=True):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]
