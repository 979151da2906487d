"""The engine's owner: one thread that alone calls the engine, and the requests' handles on it.

Request handlers (on the asyncio event loop) never touch the engine. They put commands in
the worker's inbox (add a choice, abort it, run a function between steps) and read their
outputs from their own asyncio queue, which the worker fills with `call_soon_threadsafe`.
Between steps the worker drains the inbox, so a new request joins the running batch at the
next step and an abort frees its slot before the next one.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from nanoseek.infer.engine import StepOutput
from nanoseek.infer.sampling import SamplingParams
from nanoseek.serve.metrics import Metrics

log = logging.getLogger("nanoseek.serve")


@dataclass(eq=False)
class Job:
    """One choice of one request (a request with n = 3 is three jobs)."""

    prompt_ids: list[int]
    params: SamplingParams
    index: int
    post: Callable[[Job, StepOutput | Exception], None]  # called on the worker thread
    submitted: float = field(default_factory=time.perf_counter)
    seq_id: int | None = None
    started: bool = False


class EngineWorker:
    def __init__(self, engine: Any, metrics: Metrics):
        self.engine, self.metrics = engine, metrics
        self.inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.jobs: dict[int, Job] = {}  # seq id -> job, for sequences in the engine
        self.thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)
        self.failed: BaseException | None = None

    # --- called from other threads -------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort what is still running and end the thread."""
        if self.thread.is_alive():
            self.inbox.put(("stop", None))
            self.thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def add(self, job: Job) -> None:
        self.inbox.put(("add", job))

    def abort(self, job: Job) -> None:
        self.inbox.put(("abort", job))

    def call(self, fn: Callable[[Any], Any]) -> Future:
        """fn(engine) on the worker thread, between two steps."""
        fut: Future = Future()
        self.inbox.put(("call", (fn, fut)))
        return fut

    def queued(self) -> int:
        return self.inbox.qsize()

    # --- the worker thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._commands():
                if self.engine.has_unfinished():
                    self._step()
        except BaseException as e:  # a bug: report it on /health instead of dying silently
            self.failed = e
            log.exception("engine worker stopped")
            self._fail_all(e)

    def _commands(self) -> bool:
        """Handle every command in the inbox (waiting for one when idle); False on stop."""
        block = not self.engine.has_unfinished()
        while True:
            try:
                kind, arg = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
            except queue.Empty:
                return True
            block = False
            if kind == "add":
                self._add(arg)
            elif kind == "abort":
                self._abort(arg)
            elif kind == "call":
                fn, fut = arg
                try:
                    fut.set_result(fn(self.engine))
                except Exception as e:
                    fut.set_exception(e)
            elif kind == "stop":
                for job in list(self.jobs.values()):
                    self._abort(job)
                return False

    def _add(self, job: Job) -> None:
        try:
            seq = self.engine.add_request(job.prompt_ids, job.params, stream=True)
        except Exception as e:  # the handler validated already; this is the last line
            self._post(job, e)
            return
        job.seq_id = seq.id
        self.jobs[seq.id] = job

    def _abort(self, job: Job) -> None:
        if job.seq_id is not None and self.jobs.pop(job.seq_id, None) is not None:
            self.engine.abort(job.seq_id)
            self.metrics.aborted += 1

    def _step(self) -> None:
        try:
            outs = self.engine.step()
        except Exception as e:  # keep serving: fail the requests in flight, not the server
            log.exception("engine step failed; failing the requests in flight")
            self._fail_all(e)
            return
        now = time.perf_counter()
        for out in outs:
            job = self.jobs.get(out.seq_id)
            if job is None:
                continue
            if not job.started:
                job.started = True
                self.metrics.observe_ttft(now - job.submitted)
            if out.finished:
                del self.jobs[out.seq_id]
            self._post(job, out)
        self.metrics.count_tokens(sum(len(o.token_ids) for o in outs), now)

    def _fail_all(self, e: BaseException) -> None:
        for sid, job in list(self.jobs.items()):
            try:
                self.engine.abort(sid)
            except Exception:
                pass
            self._post(job, e if isinstance(e, Exception) else RuntimeError(str(e)))
        self.jobs.clear()

    @staticmethod
    def _post(job: Job, item: StepOutput | Exception) -> None:
        try:
            job.post(job, item)
        except RuntimeError:  # the request's event loop is gone (shutdown): nobody to tell
            pass


class Submission:
    """One HTTP request's choices, read from one queue and aborted together."""

    def __init__(
        self, worker: EngineWorker, prompts: list[list[int]], params: list[SamplingParams]
    ):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[Job, StepOutput | Exception]] = asyncio.Queue()

        def post(job: Job, item: StepOutput | Exception) -> None:
            loop.call_soon_threadsafe(self.queue.put_nowait, (job, item))

        self.worker = worker
        self.jobs = [
            Job(p, sp, i, post) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
        ]
        self.open = set(range(len(self.jobs)))
        for job in self.jobs:
            worker.add(job)

    async def events(self) -> AsyncIterator[tuple[int, StepOutput]]:
        """(choice index, step output) until every choice has finished; raises a choice's
        error. Leaving early (an exception, a cancelled task) aborts the rest."""
        try:
            while self.open:
                try:
                    job, item = await asyncio.wait_for(self.queue.get(), timeout=2.0)
                except asyncio.TimeoutError:
                    if not self.worker.alive:  # it died: nobody will answer
                        raise RuntimeError("the engine worker stopped") from self.worker.failed
                    continue
                if isinstance(item, Exception):
                    self.open.discard(job.index)
                    raise item
                if item.finished:
                    self.open.discard(job.index)
                yield job.index, item
        finally:
            self.abort()

    def abort(self) -> None:
        for i in self.open:
            self.worker.abort(self.jobs[i])
        self.open.clear()
