"""Training on 1 and 2 processes (torchrun, gloo, CPU): tokens/s, peak memory per rank and the
bytes each collective moves per step, for DDP, FSDP2 and expert parallelism.

    python -m benchmarks.distributed [--preset small] [--batch-size 8] [--seq-len 256]
                                     [--steps 4] [--warmup 2] [--threads 1]

Every layout trains the same model on the same global batch (random tokens), fp32, with
`threads` CPU threads per process; the baseline is one process. Two processes use twice the
cores of one: on a quiet machine with a core per process, 2.00x is perfect scaling. Bytes are what each rank
hands to a collective per optimizer step (its input size), counted by wrapping
`torch.distributed`'s functions; DDP's gradient all-reduce runs in C++, so it is counted by
a communication hook on its buckets.

On 2 CPU cores, two processes compete for the same cores and memory bandwidth the single
process had to itself: tokens/s here measures overhead, not scaling (see docs/distributed.md
for what the numbers mean on a GPU cluster).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

LAYOUTS = [  # (name, processes, parallel, ep)
    ("1 process", 1, "fsdp", 1),
    ("DDP x2", 2, "ddp", 1),
    ("FSDP2 x2", 2, "fsdp", 1),
    ("DDP + EP=2", 2, "ddp", 2),
    ("FSDP2 + EP=2", 2, "fsdp", 2),
]
COLLECTIVES = ("all_reduce", "broadcast", "all_to_all_single")  # (tensor) or (output, input)
COLLECTIVES += ("all_gather_into_tensor", "reduce_scatter_tensor")  # (output, input)
COLLECTIVES += ("all_gather_single", "reduce_scatter_single")  # what FSDP2 calls in torch 2.13


def worker(args: argparse.Namespace) -> None:
    """One rank: train `steps` timed steps after `warmup`, write what it measured."""
    import torch
    import torch.distributed as dist

    from nanoseek.config import get_preset
    from nanoseek.model import Transformer
    from nanoseek.train.balance import update_expert_bias
    from nanoseek.train.run import build_optimizer
    from nanoseek.train.runtime import Runtime

    sent: dict[str, int] = defaultdict(int)  # bytes handed to each collective, this rank
    all_reduce = dist.all_reduce
    for name in COLLECTIVES:
        real = getattr(dist, name)

        def counting(*a, _real=real, _name=name, **kw):
            inputs = [*a[1:2], kw.get("input"), kw.get("input_tensor")]  # (output, input, ...)
            if _name in ("all_reduce", "broadcast"):  # (tensor, ...)
                inputs = [a[0] if a else kw.get("tensor")]
            src = next(t for t in inputs if t is not None)
            sent[_name] += src.numel() * src.element_size()
            return _real(*a, **kw)

        setattr(dist, name, counting)

    with Runtime.start("cpu", "fp32", args.threads, args.parallel, args.ep) as rt:
        cfg = get_preset(args.preset)
        torch.manual_seed(0)
        model = Transformer(cfg)
        model.train()
        step_model = rt.wrap(model)
        if isinstance(step_model, torch.nn.parallel.DistributedDataParallel):

            def hook(state, bucket):
                sent["all_reduce (DDP buckets)"] += bucket.buffer().numel() * 4
                fut = all_reduce(bucket.buffer(), async_op=True).get_future()
                return fut.then(lambda f: f.value()[0] / rt.world)

            step_model.register_comm_hook(None, hook)
        optimizer = build_optimizer(model, 1e-3, 0.1)
        local = args.batch_size // rt.world
        g = torch.Generator().manual_seed(rt.rank)
        counts = torch.zeros(len(model.moe_layers()), cfg.n_routed_experts, dtype=torch.long)

        def step() -> None:
            x = torch.randint(0, cfg.vocab_size, (local, args.seq_len + 1), generator=g)
            out = step_model(x[:, :-1], targets=x[:, 1:], mtp_weight=0.3)
            out.loss.backward()
            if out.expert_counts is not None:
                counts.copy_(out.expert_counts)
            rt.all_reduce_sum(counts)
            rt.clip_grads(model, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update_expert_bias(model.moe_layers(), counts, 1e-3)

        for _ in range(args.warmup):
            step()
        sent.clear()
        rt.barrier()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        rt.barrier()
        seconds = (time.perf_counter() - t0) / args.steps
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        params = sum(
            (p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters()
        )
        result = {
            "rank": rt.rank,
            "seconds_per_step": seconds,
            "peak_rss_mib": peak_mib,
            "local_params": params,
            "bytes_per_step": {k: v / args.steps for k, v in sent.items()},
        }
        Path(args.result, f"rank{rt.rank}.json").write_text(json.dumps(result))


def run_layout(args, procs: int, parallel: str, ep: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable] + (
            f"-m benchmarks.distributed --worker --result {tmp} --parallel {parallel} --ep {ep} "
            f"--preset {args.preset} --batch-size {args.batch_size} --seq-len {args.seq_len} "
            f"--steps {args.steps} --warmup {args.warmup} --threads {args.threads}"
        ).split()
        if procs > 1:
            cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        return [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per step, all ranks")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--parallel", default="fsdp", help=argparse.SUPPRESS)
    ap.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    from nanoseek.utils import format_table, human

    tokens = args.batch_size * args.seq_len
    rows, base = [], None
    for name, procs, parallel, ep in LAYOUTS:
        print(f"{name} ...", file=sys.stderr, flush=True)
        ranks = run_layout(args, procs, parallel, ep)
        tok_s = tokens / max(r["seconds_per_step"] for r in ranks)
        base = base or tok_s
        moved = defaultdict(float)
        for r in ranks:
            for k, v in r["bytes_per_step"].items():
                moved[k] = max(moved[k], v)
        comm = ", ".join(f"{k} {human(v, 3)}B" for k, v in sorted(moved.items()) if v) or "-"
        rows.append(
            (
                name,
                f"{tok_s:,.0f}",
                f"{tok_s / base:.2f}x",
                f"{max(r['peak_rss_mib'] for r in ranks):,.0f}",
                human(max(r["local_params"] for r in ranks), 3),
                comm,
            )
        )
    header = (
        "layout",
        "tokens/s",
        "vs 1 process",
        "peak RSS/rank MiB",
        "params/rank",
        "bytes per step per rank, by collective",
    )
    title = (
        f"{args.preset}, global batch {args.batch_size} x {args.seq_len}, fp32, "
        f"{args.threads} thread(s) per process, CPU + gloo"
    )
    print(format_table(rows, title, header))


if __name__ == "__main__":
    main()
