"""The model worker: one thread owns the engine and batches every caller's work into it.

Callers (the asyncio servicer) submit jobs; each tick the worker takes what is queued, runs all
pending classifications (and the input moderation of new generations) as one classifier pass,
admits new generations into the engine, and runs one engine step for every running sequence
(continuous batching: sequences join and leave between steps). Results go back to the event
loop with `call_soon_threadsafe`. A cancelled job is dropped before it costs anything more; a
running generation is removed from the engine at the next tick.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import structlog

from moderation.classifier import Classification
from moderation.guarded import GenerationResult, PreparedGeneration, TextStream
from moderation.runtime import Runtime
from moderation.telemetry import Metrics

log = structlog.get_logger(__name__)


class QueueFullError(Exception):
    """The worker's queue holds max_queue jobs already."""


class WorkerStoppedError(Exception):
    """The worker is not running (shutting down)."""


@dataclass(eq=False)
class Job:
    loop: asyncio.AbstractEventLoop
    cancelled: bool = False

    def _call(self, fn: Any, *args: Any) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(fn, *args)


@dataclass(eq=False)
class ClassifyJob(Job):
    """Already-planned items (validated at the door); the future gets their results in order."""

    planned: list[Any] = field(default_factory=list)
    future: asyncio.Future[list[Classification]] | None = None

    def resolve(self, value: list[Classification] | BaseException) -> None:
        fut = self.future
        assert fut is not None

        def settle() -> None:
            if fut.done():
                return
            if isinstance(value, BaseException):
                fut.set_exception(value)
            else:
                fut.set_result(value)

        self._call(settle)


@dataclass(eq=False)
class GenerateJob(Job):
    """A guarded generation; events ("delta", str), ("final", result), ("error", exc) arrive
    on `events`."""

    prep: PreparedGeneration | None = None
    events: asyncio.Queue[tuple[str, Any]] | None = None
    text: TextStream | None = None
    tokens: list[int] = field(default_factory=list)
    input_moderation: Classification | None = None

    def emit(self, kind: str, value: Any) -> None:
        assert self.events is not None
        self._call(self.events.put_nowait, (kind, value))


class ModelWorker:
    """Owns the runtime (engine, classifier, generator); thread-safe `submit` and `cancel`."""

    def __init__(
        self,
        runtime: Runtime,
        metrics: Metrics | None = None,
        *,
        max_queue: int = 1024,
        max_items_per_pass: int = 256,
    ):
        self.runtime = runtime
        self.metrics = metrics
        self.max_queue = max_queue
        self.max_items_per_pass = max_items_per_pass
        self._pending: deque[Job] = deque()
        self._wake = threading.Condition()
        self._running: dict[int, GenerateJob] = {}  # engine request id -> job
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued and running, then end the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def submit(self, job: Job) -> None:
        with self._wake:
            if self._stopping:
                raise WorkerStoppedError("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting)")
            self._pending.append(job)
            self._wake.notify()
        self._gauge()

    def cancel(self, job: Job) -> None:
        """Mark a job cancelled; the worker drops it at its next tick."""
        job.cancelled = True
        with self._wake:
            self._wake.notify()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._pending))
            self.metrics.running_sequences.set(len(self._running))

    # ------------------------------------------------------------- the thread

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._running and not self._stopping:
                    self._wake.wait()
                if self._stopping and not self._pending and not self._running:
                    return
                jobs = self._take()
            try:
                self._tick(jobs)
            except Exception as exc:  # keep serving: fail this tick's jobs, not the process
                log.exception("model worker tick failed")
                for job in jobs:
                    self._fail(job, exc)
                for engine_id, job in list(self._running.items()):
                    self.runtime.engine.cancel(engine_id)
                    self._fail(job, exc)
                self._running.clear()
            self._gauge()

    def _take(self) -> list[Job]:
        """Queued jobs for this tick, up to max_items_per_pass classification items."""
        jobs: list[Job] = []
        items = 0
        while self._pending and (items < self.max_items_per_pass or not jobs):
            job = self._pending.popleft()
            jobs.append(job)
            items += len(job.planned) if isinstance(job, ClassifyJob) else 1
        return jobs

    @staticmethod
    def _fail(job: Job, exc: BaseException) -> None:
        if isinstance(job, ClassifyJob):
            job.resolve(exc)
        elif isinstance(job, GenerateJob):
            job.emit("error", exc)

    def _tick(self, jobs: list[Job]) -> None:
        rt = self.runtime
        classify = [j for j in jobs if isinstance(j, ClassifyJob) and not j.cancelled]
        new_gens = [j for j in jobs if isinstance(j, GenerateJob) and not j.cancelled]
        gated = [g for g in new_gens if g.prep is not None and g.prep.input_item is not None]
        # One classifier pass for every classification of this tick, input moderation included.
        planned = [p for j in classify for p in j.planned]
        planned += [rt.classifier.plan(g.prep.input_item) for g in gated]  # type: ignore[union-attr,arg-type]
        if planned:
            before = rt.engine.stats.prefix_tokens_reused
            results = rt.classifier.run(planned)
            if self.metrics is not None:
                self.metrics.batch_size.labels(kind="classify").observe(len(planned))
                if rt.engine.stats.prefix_tokens_reused > before:
                    self.metrics.prefix_hits.inc(len(planned))
            offset = 0
            for cjob in classify:
                cjob.resolve(results[offset : offset + len(cjob.planned)])
                offset += len(cjob.planned)
            for g in gated:
                g.input_moderation = results[offset]
                offset += 1
        for g in new_gens:
            assert g.prep is not None
            moderation = g.input_moderation
            if moderation is not None and moderation.flagged:
                g.emit("final", rt.generator.refuse_input(g.prep, moderation))
                continue
            g.text = TextStream(rt.tokenizer)
            self._running[rt.engine.add_request(rt.generator.request(g.prep))] = g
        for engine_id, g in list(self._running.items()):
            if g.cancelled:
                rt.engine.cancel(engine_id)
                del self._running[engine_id]
        if rt.engine.has_unfinished():
            self._step()

    def _step(self) -> None:
        rt = self.runtime
        computed = rt.engine.stats.tokens_computed
        if self.metrics is not None:
            self.metrics.batch_size.labels(kind="generate").observe(rt.engine.num_running)
        events = rt.engine.step()
        if self.metrics is not None:
            self.metrics.tokens.labels(kind="computed").inc(
                rt.engine.stats.tokens_computed - computed
            )
        eos = rt.tokenizer.eos_id
        for ev in events:
            g = self._running.get(ev.request_id)
            if g is None or g.prep is None or g.text is None:
                continue
            g.tokens.append(ev.token)
            if not (ev.finish_reason == "stop" and ev.token == eos):
                delta = g.text.push(ev.token)
                if delta and not g.prep.options.moderate_output:
                    g.emit("delta", delta)
            if ev.finished:
                del self._running[ev.request_id]
                result: GenerationResult = rt.generator.finish(
                    g.prep, g.tokens, ev.finish_reason or "length", g.input_moderation
                )
                g.emit("final", result)
