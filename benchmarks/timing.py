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
