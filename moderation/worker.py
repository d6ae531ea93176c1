"""The model worker: one thread owns the engine and batches every caller's work into it.

The engine, classifier and generator are not thread-safe, so only this thread touches them.
Callers on the asyncio event loop submit jobs (`classify`, `generate`); each tick the worker

1. drops cancelled and expired work: queued jobs never start, running sequences leave the
   engine (`engine.cancel`) before the next step, so they cost nothing more;
2. runs one classifier pass for every classification due: queued Classify/ClassifyBatch items,
   the input moderation of new generations and the output moderation of finished answers;
3. admits new generations into the engine and runs one engine step for all running sequences
   (continuous batching: sequences join and leave between steps).

Results go back to the event loop with `call_soon_threadsafe`, once per tick and loop for all of
the tick's results: each call writes to the loop's wake-up pipe, and a batch of 32 answers
would otherwise wake the loop 32 times while it competes with this thread for the GIL. The
worker never waits to fill a
batch: under load, requests queue up while a pass runs and the next pass takes them all, so
batches grow with the load and a lone request runs at once. (A gathering delay was measured and
brought nothing on top of that.)
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from model.errors import RequestError
from moderation.classifier import Classification, ClassificationError, ClassifyItem
from moderation.guarded import GenerationResult, PreparedGeneration, TextStream
from moderation.metrics import Metrics
from moderation.runtime import Runtime

log = structlog.get_logger(__name__)


class QueueFullError(Exception):
    """The worker already holds max_queue waiting requests."""


class WorkerStoppedError(Exception):
    """The worker is shutting down and takes no new work."""


class DeadlineExpiredError(Exception):
    """The caller's deadline passed before the work was done."""


_tick = threading.local()  # .outbox: the results of the worker's current tick


def _deliver(calls: list[tuple[Callable[..., Any], tuple[Any, ...]]]) -> None:
    for fn, args in calls:
        fn(*args)


def _flush(outbox: list[tuple[Job, Callable[..., Any], tuple[Any, ...]]]) -> None:
    """One call_soon_threadsafe per event loop for a tick's results, in order."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Callable[..., Any], tuple[Any, ...]]]]
    by_loop = {}
    for job, fn, args in outbox:
        by_loop.setdefault(job.loop, []).append((fn, args))
    for loop, calls in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop closed: its callers are gone
            loop.call_soon_threadsafe(_deliver, calls)


@dataclass(eq=False)  # identity equality: jobs are removed from the queue by identity
class Job:
    loop: asyncio.AbstractEventLoop
    deadline: float | None = None  # time.monotonic() after which nobody waits for the answer
    cancelled: bool = False

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        outbox: list[tuple[Job, Callable[..., Any], tuple[Any, ...]]] | None = getattr(
            _tick, "outbox", None
        )
        if outbox is not None:  # in a worker tick: delivered together when it ends
            outbox.append((self, fn, args))
            return
        with contextlib.suppress(RuntimeError):  # the loop closed: the caller is gone
            self.loop.call_soon_threadsafe(fn, *args)

    def fail(self, exc: BaseException) -> None:
        raise NotImplementedError


@dataclass(eq=False)
class ClassifyJob(Job):
    """Items already planned (validated) at the door; `future` gets their results in order."""

    planned: list[Any] = field(default_factory=list)
    future: asyncio.Future[list[Classification]] | None = None

    def resolve(self, value: list[Classification] | BaseException) -> None:
        fut = self.future
        if fut is None:
            return

        def settle() -> None:
            if fut.done():
                return
            if isinstance(value, BaseException):
                fut.set_exception(value)
            else:
                fut.set_result(value)

        self._call(settle)

    def fail(self, exc: BaseException) -> None:
        self.resolve(exc)


@dataclass(eq=False)
class GenerateJob(Job):
    """A guarded generation; its events (str deltas, then a GenerationResult, or an exception)
    arrive on `events`."""

    prep: PreparedGeneration | None = None
    stream: bool = True  # send text deltas (unary Generate only needs the result)
    events: asyncio.Queue[str | GenerationResult | BaseException] | None = None
    text: TextStream | None = None
    tokens: list[int] = field(default_factory=list)
    input_moderation: Classification | None = None

    def emit(self, event: str | GenerationResult | BaseException) -> None:
        if self.events is not None:
            self._call(self.events.put_nowait, event)

    def fail(self, exc: BaseException) -> None:
        self.emit(exc)


@dataclass
class _OutputCheck:
    """A finished answer waiting for its output moderation in the next classifier pass."""

    job: GenerateJob
    planned: Any
    finish_reason: str


async def generation_events(
    events: asyncio.Queue[str | GenerationResult | BaseException],
) -> AsyncGenerator[str | GenerationResult, None]:
    """A generation's text deltas, then its result; an exception put on the queue is raised."""
    while True:
        event = await events.get()
        if isinstance(event, BaseException):
            raise event
        yield event
        if isinstance(event, GenerationResult):
            return


class ModelWorker:
    """Owns the runtime (engine, classifier, generator); `submit` and `cancel` are
    thread-safe, `classify` and `generate` are the event loop's way in."""

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
        self._cond = threading.Condition()
        self._running: dict[int, GenerateJob] = {}  # engine request id -> job
        self._checks: list[_OutputCheck] = []
        self._engine_waiting = 0  # admitted generations waiting for an engine slot
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)

    # ------------------------------------------------------------ any thread

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Take no new work, finish what is queued and running, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the model: queued jobs and generations waiting for a slot."""
        return len(self._pending) + self._engine_waiting

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise WorkerStoppedError("the server is shutting down")
            if self.queue_depth >= self.max_queue:
                raise QueueFullError(
                    f"the queue is full ({self.max_queue} requests waiting); retry later"
                )
            self._pending.append(job)
            self._cond.notify()
        self._gauge()

    def cancel(self, job: Job) -> None:
        """Nobody waits for this job any more: drop it if queued, stop it if running."""
        with self._cond:
            job.cancelled = True
            # Not started: dropped, it costs nothing. Running: stopped at the next tick.
            with contextlib.suppress(ValueError):
                self._pending.remove(job)
            self._cond.notify()
        self._gauge()

    # -------------------------------------------------------- the event loop

    async def classify(
        self, planned: Sequence[Any], *, deadline: float | None = None
    ) -> list[Classification]:
        """Results of planned items, in order, from a shared classifier pass."""
        loop = asyncio.get_running_loop()
        job = ClassifyJob(loop, deadline, planned=list(planned), future=loop.create_future())
        self.submit(job)
        try:
            assert job.future is not None
            return await job.future
        except asyncio.CancelledError:  # the client cancelled or its deadline passed
            self.cancel(job)
            raise

    async def generate(
        self, prep: PreparedGeneration, *, stream: bool, deadline: float | None = None
    ) -> AsyncGenerator[str | GenerationResult, None]:
        """Text deltas (when `stream`), then the result; the engine batches it with others."""
        job = GenerateJob(
            asyncio.get_running_loop(), deadline, prep=prep, stream=stream, events=asyncio.Queue()
        )
        self.submit(job)
        try:
            assert job.events is not None
            async for event in generation_events(job.events):
                yield event
        finally:
            self.cancel(job)  # a no-op once finished; otherwise stop generating for nobody

    # ------------------------------------------------------------ the thread

    def _busy(self) -> bool:
        return bool(self._running or self._checks)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._busy() and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._pending and not self._busy():
                    return
            self.run_once()

    @property
    def has_work(self) -> bool:
        """Queued jobs, running generations or answers waiting for output moderation."""
        return bool(self._pending or self._busy())

    def run_once(self) -> None:
        """One tick over what is queued now. The worker's own thread calls it in a loop; the
        model process (moderation.process_worker) drives a worker without a thread with it."""
        with self._cond:
            jobs = self._take()
        _tick.outbox = []
        try:
            self._tick(jobs)
        except Exception as exc:  # a bug must fail this tick's requests, not the worker
            log.exception("model worker tick failed")
            for job in jobs:
                job.fail(exc)
        finally:
            outbox, _tick.outbox = _tick.outbox, None
            _flush(outbox)
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

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.queue_depth)
            self.metrics.running_sequences.set(len(self._running))

    def _tick(self, jobs: list[Job]) -> None:
        rt = self.runtime
        now = time.monotonic()
        computed = rt.engine.stats.tokens_computed
        live: list[Job] = []
        for job in jobs:
            if job.expired(now):
                job.fail(DeadlineExpiredError("the deadline passed while the request waited"))
            elif not job.cancelled:
                live.append(job)
        self._drop_stopped(now)
        generations = [j for j in live if isinstance(j, GenerateJob)]
        self._classifier_pass([j for j in live if isinstance(j, ClassifyJob)], generations)
        for g in generations:
            self._admit(g)
        if rt.engine.has_unfinished():
            try:
                self._step()
            except Exception as exc:  # fail the batch, keep the server
                log.exception("engine step failed")
                for engine_id, g in list(self._running.items()):
                    rt.engine.cancel(engine_id)
                    g.fail(exc)
                self._running.clear()
        self._engine_waiting = rt.engine.num_waiting
        if self.metrics is not None:
            self.metrics.tokens.labels(kind="computed").inc(
                rt.engine.stats.tokens_computed - computed
            )

    def _drop_stopped(self, now: float) -> None:
        """Cancelled or expired generations leave the engine before the next step."""
        for engine_id, g in list(self._running.items()):
            if g.cancelled or g.expired(now):
                self.runtime.engine.cancel(engine_id)
                del self._running[engine_id]
                if not g.cancelled:
                    g.fail(DeadlineExpiredError("the deadline passed during generation"))
        self._checks = [c for c in self._checks if not c.job.cancelled]

    def _classifier_pass(self, classify: list[ClassifyJob], generations: list[GenerateJob]) -> None:
        """One classifier pass for every classification due this tick."""
        rt = self.runtime
        gated: list[GenerateJob] = []  # generations whose input is moderated first
        inputs: list[ClassifyItem] = []
        for g in generations:
            if g.prep is not None and g.prep.input_item is not None:
                gated.append(g)
                inputs.append(g.prep.input_item)
        checks, self._checks = self._checks, []
        planned = [p for j in classify for p in j.planned]
        try:
            planned += [rt.classifier.plan(item) for item in inputs]
            planned += [c.planned for c in checks]
            results = self._run_classifier(planned) if planned else []
        except Exception as exc:
            log.exception("classifier pass failed")
            for job in [*classify, *gated, *(c.job for c in checks)]:
                job.fail(exc)
            for g in gated:
                generations.remove(g)
            return
        at = 0
        for cjob in classify:
            cjob.resolve(results[at : at + len(cjob.planned)])
            at += len(cjob.planned)
        for g in gated:
            g.input_moderation = results[at]
            at += 1
        for check in checks:
            self._finish(check.job, check.finish_reason, results[at])
            at += 1

    def _run_classifier(self, planned: list[Any]) -> list[Classification]:
        rt = self.runtime
        reused = rt.engine.stats.prefix_tokens_reused
        results = rt.classifier.run(planned)
        if self.metrics is not None:
            self.metrics.batch_size.labels(kind="classify").observe(len(planned))
            delta = rt.engine.stats.prefix_tokens_reused - reused
            if delta:
                self.metrics.prefix_hits.inc(len(planned))
                self.metrics.prefix_tokens.inc(delta)
        return results

    def _admit(self, g: GenerateJob) -> None:
        """Refuse a flagged input, otherwise queue the sequence into the engine."""
        rt = self.runtime
        assert g.prep is not None
        moderation = g.input_moderation
        if moderation is not None and moderation.flagged:
            g.emit(rt.generator.refuse_input(g.prep, moderation))
            return
        try:
            engine_id = rt.engine.add_request(rt.generator.request(g.prep))
        except RequestError as exc:  # e.g. prompt + max_new_tokens beyond the context
            g.fail(ClassificationError("messages", str(exc)))
            return
        g.text = TextStream(rt.tokenizer)
        self._running[engine_id] = g

    def _step(self) -> None:
        rt = self.runtime
        events = rt.engine.step()
        if self.metrics is not None and events:
            self.metrics.batch_size.labels(kind="generate").observe(len(events))
        eos = rt.tokenizer.eos_id
        for ev in events:
            g = self._running.get(ev.request_id)
            if g is None or g.prep is None or g.text is None:
                continue
            g.tokens.append(ev.token)
            if not (ev.finish_reason == "stop" and ev.token == eos):
                delta = g.text.push(ev.token)
                # With output moderation on, nothing is sent before the answer was checked.
                if delta and g.stream and not g.prep.options.moderate_output:
                    g.emit(delta)
            if not ev.finished:
                continue
            del self._running[ev.request_id]
            reason = ev.finish_reason or "length"
            answer = g.text.text()
            if g.prep.options.moderate_output and answer.strip():
                try:
                    planned = rt.classifier.plan(g.prep.output_item(answer))
                except ClassificationError as exc:
                    # Never release an answer that could not be checked.
                    g.fail(RuntimeError(f"output moderation failed: {exc}"))
                    continue
                self._checks.append(_OutputCheck(g, planned, reason))  # the next pass checks it
            else:
                self._finish(g, reason, None)

    def _finish(self, g: GenerateJob, reason: str, output: Classification | None) -> None:
        assert g.prep is not None
        result = self.runtime.generator.finish(
            g.prep, g.tokens, reason, g.input_moderation, output_moderation=output
        )
        g.emit(result)
