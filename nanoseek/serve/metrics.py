"""Server metrics in Prometheus' text format (version 0.0.4), without a client library.

Counters and the time-to-first-token histogram are kept here; the engine's state (requests
running and waiting, KV cache, speculation, expert load) is read by `engine_snapshot` on the
engine's own thread, between steps, when /metrics is scraped.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_WINDOW = 10.0  # seconds over which tokens/s is averaged


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts = buckets, [0] * len(buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, x: float) -> None:
        for i, b in enumerate(self.buckets):
            if x <= b:
                self.counts[i] += 1
        self.sum, self.count = self.sum + x, self.count + 1


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = time.time()
        self.requests: dict[tuple[str, int], int] = {}  # (route, status) -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.aborted = 0  # choices aborted (client gone, or shutdown)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) in the rate window

    def count_request(self, route: str, status: int) -> None:
        with self.lock:
            self.requests[route, status] = self.requests.get((route, status), 0) + 1

    def observe_ttft(self, seconds: float) -> None:
        with self.lock:
            self.ttft.observe(seconds)

    def count_tokens(self, n: int, now: float) -> None:
        with self.lock:
            if n:
                self.recent.append((now, n))
            while self.recent and self.recent[0][0] < now - RATE_WINDOW:
                self.recent.popleft()

    def tokens_per_second(self, now: float) -> float:
        with self.lock:
            n = sum(k for t, k in self.recent if t >= now - RATE_WINDOW)
        return n / RATE_WINDOW

    def render(self, engine: dict[str, Any], queued: int) -> str:
        """The text /metrics returns; `engine` is an engine_snapshot, `queued` the requests
        handed to the worker that the engine has not seen yet."""
        with self.lock:
            reqs = sorted(self.requests.items())
            h = self.ttft
            ttft = [(f'_bucket{{le="{b}"}}', n) for b, n in zip(h.buckets, h.counts, strict=True)]
            ttft += [('_bucket{le="+Inf"}', h.count), ("_sum", h.sum), ("_count", h.count)]
            prompt, completion, aborted = self.prompt_tokens, self.completion_tokens, self.aborted
        drafted, accepted = engine["drafted"], engine["accepted"]
        single = [  # (name, type, help, value)
            ("requests_running", "gauge", "Sequences in the running batch.", engine["running"]),
            (
                "requests_waiting",
                "gauge",
                "Sequences waiting for a cache slot.",
                engine["waiting"] + queued,
            ),
            ("prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", prompt),
            ("generation_tokens_total", "counter", "Tokens generated.", engine["tokens_generated"]),
            ("completion_tokens_total", "counter", "Tokens returned to clients.", completion),
            ("aborted_total", "counter", "Choices aborted (client gone or shutdown).", aborted),
            (
                "generation_tokens_per_second",
                "gauge",
                f"Tokens generated per second over the last {RATE_WINDOW:.0f} s.",
                self.tokens_per_second(time.perf_counter()),
            ),
            ("kv_cache_slots", "gauge", "KV cache sequence slots.", engine["slots"]),
            (
                "kv_cache_slots_used",
                "gauge",
                "KV cache slots holding a sequence.",
                engine["slots_used"],
            ),
            ("kv_cache_bytes", "gauge", "Bytes allocated for the KV cache.", engine["cache_bytes"]),
            (
                "kv_cache_bytes_used",
                "gauge",
                "KV cache bytes holding tokens of running sequences.",
                engine["cache_bytes_used"],
            ),
            ("spec_drafted_total", "counter", "MTP draft tokens proposed.", drafted),
            ("spec_accepted_total", "counter", "MTP draft tokens accepted.", accepted),
            (
                "spec_acceptance_rate",
                "gauge",
                "Accepted / drafted MTP tokens (0 without them).",
                accepted / max(drafted, 1),
            ),
            (
                "prefix_cache_hits_total",
                "counter",
                "Prompts that reused a cached prefix.",
                engine["prefix_hits"],
            ),
            (
                "prefix_cache_reused_tokens_total",
                "counter",
                "Prompt tokens whose latent rows came from the prefix cache, not a prefill.",
                engine["prefix_reused_tokens"],
            ),
            (
                "prefix_cache_tokens",
                "gauge",
                "Tokens the prefix cache holds.",
                engine["prefix_tokens"],
            ),
        ]
        families = [(n, t, h, [("", v)]) for n, t, h, v in single]
        families.append(
            (
                "http_requests_total",
                "counter",
                "HTTP requests by route and status.",
                [(f'{{route="{r}",code="{c}"}}', n) for (r, c), n in reqs],
            )
        )
        families.append(
            (
                "time_to_first_token_seconds",
                "histogram",
                "From the request reaching the engine's queue to its first token.",
                ttft,
            )
        )
        experts = engine["expert_counts"]
        if experts is not None:
            families.append(
                (
                    "expert_tokens_total",
                    "counter",
                    "Tokens routed to each expert of each MoE layer by served traffic.",
                    [
                        (f'{{layer="{i}",expert="{j}"}}', n)
                        for i, row in enumerate(experts)
                        for j, n in enumerate(row)
                    ],
                )
            )
            families.append(
                (
                    "expert_load_max_over_mean",
                    "gauge",
                    "Per MoE layer: the busiest expert's tokens over the mean (1 = balanced).",
                    [
                        (f'{{layer="{i}"}}', max(row) * len(row) / sum(row) if sum(row) else 0)
                        for i, row in enumerate(experts)
                    ],
                )
            )
        out = []
        for name, kind, help, samples in families:
            out += [f"# HELP nanoseek_{name} {help}", f"# TYPE nanoseek_{name} {kind}"]
            out += [f"nanoseek_{name}{labels} {_num(v)}" for labels, v in samples]
        return "\n".join(out) + "\n"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def engine_snapshot(engine: Any) -> dict[str, Any]:
    """Plain numbers from the engine; runs on the worker thread (see EngineWorker.call)."""
    sched, cache, prefix = engine.scheduler, engine.cache, engine.prefix
    held = sum(s.num_tokens for s in sched.running)
    spec, experts = engine.spec_stats, engine.expert_counts
    return {
        "running": len(sched.running),
        "waiting": len(sched.waiting),
        "tokens_generated": engine.tokens_generated,
        "slots": cache.slots,
        "slots_used": cache.used,
        "cache_bytes": cache.nbytes(),
        "cache_bytes_used": held * cache.bytes_per_token(),
        "drafted": spec.drafted,
        "accepted": spec.accepted,
        "expert_counts": experts.tolist() if experts is not None else None,
        "prefix_hits": prefix.hits if prefix else 0,
        "prefix_reused_tokens": prefix.reused_tokens if prefix else 0,
        "prefix_tokens": prefix.tokens if prefix else 0,
    }
