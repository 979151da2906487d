"""Rollouts in a process of their own (async GRPO): one core samples step t + 1's
completions while the other updates the policy on step t's.

The worker holds its own copy of the policy and samples from the weights the trainer last
published (shared memory, no disk): the trainer publishes its current weights and asks for
the next step's rollouts right after receiving this step's, then updates. So step t's
rollouts come from the weights before step t - 1's update (one step stale; step 0's and
1's both from the starting weights), and the loss corrects for it with the importance
ratio to the log-probs the sampler drew them with (`Rollouts.behaviour_logp`).

What a step computes depends only on the published weights and the step's seeds, never on
timing: the published weights are the only state, and a checkpoint stores them beside the
model's (`sampler_state`), so a resumed run samples what the uninterrupted one did.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
from typing import Any

import torch

from nanoseek.data.tokenizer import Tokenizer
from nanoseek.model import Transformer
from nanoseek.posttrain.errors import PostTrainError
from nanoseek.posttrain.tasks import Task

POLL_S = 1.0  # how often a waiting side checks that the other is still alive


class RolloutWorker:
    """The trainer's handle on the rollout process: `publish(model)` then `submit(step)`,
    later `result()` -> (Rollouts, the worker's sampling seconds)."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        task: Task,
        cfg: Any,  # RLConfig (rl.py imports this module)
        threads: int = 1,
        sampler_state: dict[str, torch.Tensor] | None = None,
    ):
        # the weights the worker samples from: filled by publish(), read by the worker at
        # the start of each job
        self.weights = {
            k: v.detach().to("cpu", torch.float32, copy=True).share_memory_()
            for k, v in model.state_dict().items()
        }
        if sampler_state is not None:
            self.load_state(sampler_state)
        ctx = mp.get_context("spawn")  # fork would inherit torch's OpenMP pool
        self.jobs, self.results = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(
            target=_serve,
            args=(
                model.config,
                tokenizer,
                task,
                cfg,
                threads,
                self.weights,
                self.jobs,
                self.results,
            ),
            daemon=True,  # never outlives the trainer
            name="nanoseek-rollouts",
        )
        self.proc.start()
        self.pending: int | None = None

    def publish(self, model: Transformer) -> None:
        """The model's current weights become what the next job samples from. Only while no
        job is in flight: the worker reads them when a job starts."""
        assert self.pending is None, "publish() while a job is in flight"
        self.load_state(model.state_dict())

    def submit(self, step: int) -> None:
        assert self.pending is None, "one job at a time"
        self.jobs.put(step)
        self.pending = step

    def result(self) -> tuple[Any, float]:
        """Wait for the job in flight -> (Rollouts, seconds the worker took)."""
        assert self.pending is not None, "no job in flight"
        while True:
            try:
                kind, step, payload, seconds = self.results.get(timeout=POLL_S)
                break
            except queue.Empty:
                if not self.proc.is_alive():
                    raise PostTrainError(
                        f"the rollout process died (exit code {self.proc.exitcode})"
                    ) from None
        if kind == "error":
            raise PostTrainError(f"the rollout process failed:\n{payload}")
        assert step == self.pending, (step, self.pending)
        self.pending = None
        return payload, seconds

    def state(self) -> dict[str, torch.Tensor]:
        """The published weights (what the job in flight samples from), for the checkpoint:
        the shared tensors themselves, unchanged until the next publish()."""
        return self.weights

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy `state` (a checkpoint's, or the model's) into the published weights."""
        missing = set(self.weights) ^ set(state)
        if missing:
            raise PostTrainError(
                f"the checkpoint's rollout weights do not match the model ({len(missing)} "
                "tensors differ); start afresh with --overwrite"
            )
        with torch.no_grad():
            for k, v in state.items():
                self.weights[k].copy_(v)

    def close(self) -> None:
        if self.proc.is_alive() and self.pending is None:  # idle: let it exit
            self.jobs.put(None)
            self.proc.join(timeout=5)
        if self.proc.is_alive():  # a job nobody will read (the run's budget is spent)
            self.proc.kill()
            self.proc.join()
        for q in (self.jobs, self.results):
            q.cancel_join_thread()  # a result nobody will read must not block the exit
            q.close()

    def __enter__(self) -> RolloutWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve(
    config: Any,
    tokenizer: Tokenizer,
    task: Task,
    cfg: Any,
    threads: int,
    weights: dict[str, torch.Tensor],
    jobs: Any,
    results: Any,
) -> None:
    """The worker's loop: per job, load the published weights and sample the step."""
    from nanoseek.posttrain.rl import make_engine, rollout  # rl.py imports this module

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    torch.set_num_threads(threads)
    parent = os.getppid()
    try:
        model = Transformer(config)
        model.eval().requires_grad_(False)
        engine = make_engine(model, tokenizer, task, cfg)
    except BaseException:
        results.put(("error", -1, traceback.format_exc(), 0.0))
        return
    while True:
        try:
            step = jobs.get(timeout=POLL_S)
        except queue.Empty:
            if os.getppid() != parent:  # the trainer was killed: nobody will ask again
                return
            continue
        if step is None:
            return
        try:
            t0 = time.perf_counter()
            with torch.no_grad():
                model.load_state_dict(weights)
            engine.refresh_weights()
            roll, _ = rollout(engine, tokenizer, task, cfg, step, 0)
            results.put(("ok", step, roll, time.perf_counter() - t0))
        except BaseException:
            results.put(("error", step, traceback.format_exc(), 0.0))
            return
