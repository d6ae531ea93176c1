"""The scheduler: one tick at a time, it batches every caller's work into the model.

The engine, classifier and generator are not thread-safe, so one thread runs the ticks (the
worker thread, or the model process's main loop); `submit` and `cancel` are thread-safe. Each
tick is planned from plain data first (`tick_plan.plan_tick`: what expires, what rides in the
classifier pass, which generations enter the engine, whose checks ride in the step), then
executed here:

1. drops cancelled and expired work: queued jobs never start, running sequences leave the
   engine (`engine.cancel`) before the next step, so they cost nothing more;
2. runs one classifier pass for every classification due: queued Classify/ClassifyBatch items,
   the input moderation of new generations and the output moderation of finished answers;
3. admits new generations into the engine and runs one engine step for all running sequences
   (continuous batching: sequences join and leave between steps);
4. runs one check pass for every answer whose output moderation is due (every
   `stream_check_tokens` tokens, and its tail once finished): the text a check passes is sent,
   an answer a check flags stops at once. The checks of answers this server did not generate
   (ModerateStream, `answer_checks`) ride in the same pass.

The scheduler never waits to fill a batch: under load, requests queue up while a pass runs and
the next pass takes them all, so batches grow with the load and a lone request runs at once.
(A gathering delay was measured and brought nothing on top of that.) How answers reach their
callers is each job's `reply` callback's business (`serving.job`).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import structlog

from model.errors import RequestError
from moderation.core.decision import Classification, PlannedItem
from moderation.core.errors import InvalidArgument
from moderation.core.generation import GenerationResult
from moderation.core.guarded import AnswerDecoder
from moderation.core.text_safety import is_blank
from moderation.runtime import Runtime
from moderation.serving.metrics import WorkerMetrics
from moderation.serving.worker import (
    DeadlineExpiredError,
    GenerationFailedError,
    QueueFullError,
    WorkerStoppedError,
)
from moderation.serving.worker.answer_checks import AnswerChecks, CheckJob, Due
from moderation.serving.worker.job import Job
from moderation.serving.worker.tick_plan import (
    Held,
    Queued,
    TickPlan,
    TickState,
    gather_seconds,
    has_slots_for_checks,
    plan_tick,
)

log = structlog.get_logger(__name__)


@dataclass
class _OutputCheck:
    """A finished answer waiting for its output moderation in the next classifier pass."""

    job: Job
    planned: PlannedItem
    finish_reason: str


class Scheduler:
    """Owns the runtime (engine, classifier, generator) and the queue of jobs."""

    def __init__(
        self,
        runtime: Runtime,
        metrics: WorkerMetrics | None = None,
        *,
        max_queue: int = 1024,
        max_items_per_pass: int = 256,
        batch_wait: float = 0.0,
    ):
        self.runtime = runtime
        self.engine = runtime.engine
        self.metrics = metrics
        self.max_queue = max_queue
        self.max_items_per_pass = max_items_per_pass
        self.batch_wait = batch_wait  # seconds a pass may wait to fill (--batch-wait-ms)
        self._tick_ended = 0.0  # time.monotonic() when the last tick ended
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._answers = AnswerChecks(runtime.classifier, self._cond)
        self._running: dict[int, Job] = {}  # engine request id -> job
        self._checks: list[_OutputCheck] = []
        # Generations with output moderation waiting for two free slots (the answer's and its
        # check's), admitted first at the next tick.
        self._slot_wait: list[Job] = []
        self._engine_waiting = 0  # admitted generations waiting for an engine slot
        self._stopping = False
        if metrics is not None:  # the cache's capacity, for the in-use gauges' ratio
            metrics.kv_cache_slots.set(self.engine.max_batch_size)
            metrics.kv_cache_tokens.set(self.engine.max_batch_size * self.engine.cache.window)

    # ------------------------------------------------------------ any thread

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the model: queued jobs and generations waiting for a slot."""
        return (
            len(self._pending)
            + self._engine_waiting
            + len(self._slot_wait)
            + len(self._answers.waiting)
        )

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

    def open_check(self, job: CheckJob) -> None:
        """Open a ModerateStream check (its slot is taken at the next tick that has one)."""
        with self._cond:
            if self._stopping:
                raise WorkerStoppedError("the server is shutting down")
            self._answers.incoming.append(job)
            self._cond.notify()

    def feed(self, job: CheckJob, tokens: list[int], end: bool) -> None:
        """A ModerateStream check's next tokens (`end`: the answer is complete)."""
        with self._cond:
            self._answers.feed(job, tokens, end)
            self._cond.notify()

    def cancel(self, job: Job | CheckJob) -> None:
        """Nobody waits for this job any more: drop it if queued, stop it if running."""
        with self._cond:
            job.cancelled = True
            # Not started: dropped, it costs nothing. Running: stopped at the next tick.
            if isinstance(job, Job):
                with contextlib.suppress(ValueError):
                    self._pending.remove(job)
            self._cond.notify()
        self._gauge()

    def close(self) -> None:
        """Take no new work; what is queued and running still finishes."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def wait_for_work(self) -> bool:
        """Block until there is work (and, with `batch_wait`, until the pass is full or the
        wait is over: `gather_wait`); False once closed and all work is done."""
        with self._cond:
            while not self._pending and not self._busy() and not self._stopping:
                self._cond.wait()
            while not self._stopping and (pause := self._gather_wait()) > 0:
                self._cond.wait(pause)
            return not (self._stopping and not self._pending and not self._busy())

    def gather_wait(self) -> float:
        """Seconds the next tick should wait for more requests before it runs (0: now)."""
        if self.batch_wait <= 0:
            return 0.0
        with self._cond:
            return self._gather_wait()

    def _gather_wait(self) -> float:
        """`gather_wait` with the lock held: tick_plan.gather_seconds on the queue's head."""
        if self.batch_wait <= 0 or not self._pending:
            return 0.0
        # A full pass: what the classifier scores at once (larger batches run in groups of it).
        full = min(self.max_items_per_pass, int(self.engine.score_batch_size))
        head = list(itertools.islice(self._pending, full))
        return gather_seconds(
            now=time.monotonic(),
            since=max(head[0].queued_at, self._tick_ended),
            items=sum(j.items for j in head),
            full=full,
            wait=self.batch_wait,
            # A queued generation waits for its first token; running ones for their next.
            busy=self._busy() or any(j.prep is not None for j in head),
        )

    # ------------------------------------------------------ the ticking thread

    def _busy(self) -> bool:
        return bool(self._running or self._checks or self._slot_wait or self._answers.busy())

    @property
    def has_work(self) -> bool:
        """Queued jobs, running generations or answers waiting for output moderation."""
        return bool(self._pending or self._busy())

    def run_once(self) -> None:
        """One tick: plan it from the queue and what runs, then execute the plan."""
        start = time.perf_counter()
        with self._cond:
            plan = plan_tick(self._state())
            jobs = [self._pending.popleft() for _ in range(plan.take)]
        try:
            self._execute(plan, jobs)
        except Exception as exc:  # a bug must fail this tick's requests, not the worker
            log.exception("model worker tick failed")
            for job in jobs:
                job.fail(exc)
        self._gauge()
        if self.metrics is not None:
            self.metrics.step_seconds.observe(time.perf_counter() - start)
        self._tick_ended = time.monotonic()

    def _state(self) -> TickState:
        """What the plan is made from: plain data (called with the lock held)."""
        now = time.monotonic()
        limit = self.max_items_per_pass
        queued = [
            Queued(
                j.key,
                j.deadline,
                j.cancelled,
                j.items,
                j.prep is not None,
                j.prep is not None and j.prep.input_planned is not None,
            )
            for j in itertools.islice(self._pending, limit)  # each job has an item at least
        ]
        return TickState(
            now,
            queued,
            running=[
                Held(
                    g.key, g.deadline, g.cancelled, g.decoder is not None and g.decoder.check_due()
                )
                for g in self._running.values()
            ],
            slot_wait=[Held(g.key, g.deadline, g.cancelled) for g in self._slot_wait],
            output_checks=[Held(c.job.key, c.job.deadline, c.job.cancelled) for c in self._checks],
            max_items_per_pass=limit,
        )

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.queue_depth)
            self.metrics.running_sequences.set(len(self._running))
            slots, tokens = cache_in_use(self.engine)
            self.metrics.kv_cache_slots_in_use.set(slots)
            self.metrics.kv_cache_tokens_in_use.set(tokens)

    def _execute(self, plan: TickPlan, jobs: list[Job]) -> None:
        computed = self.engine.stats.tokens_computed
        taken = {j.key: j for j in jobs}
        running = {g.key: g for g in self._running.values()}
        waiting = {g.key: g for g in self._slot_wait}
        for key in plan.expired:
            taken[key].fail(DeadlineExpiredError("the deadline passed while the request waited"))
        now = time.monotonic()
        for key in (*plan.classify, *(k for k in plan.admit if k in taken)):
            taken[key].started_at = now  # time in the model from here
            if self.metrics is not None:
                self.metrics.queue_wait.observe(now - taken[key].queued_at)
        for key in (*plan.stop, *plan.stop_expired):
            g = running[key]
            assert g.engine_id is not None
            self._stop(g.engine_id, g)
            del self._running[g.engine_id]
        for key in plan.stop_expired:
            running[key].fail(DeadlineExpiredError("the deadline passed during generation"))
        for key in plan.unwait_expired:
            waiting[key].fail(DeadlineExpiredError("the deadline passed while the request waited"))
        keep = set(plan.output_checks)
        self._checks = [c for c in self._checks if c.job.key in keep]
        refused = self._classifier_pass(
            [taken[k] for k in plan.classify], [taken[k] for k in plan.moderate_inputs]
        )
        self._slot_wait = []
        for key in plan.admit:
            if key not in refused:
                self._admit(waiting[key] if key in waiting else taken[key])
        with self._cond:
            opened = self._answers.take_incoming()
        self._answers.drop_stopped(time.monotonic())
        self._answers.admit(opened)
        due = self._answers.due()
        if self.engine.has_unfinished() or self._running or due:
            try:
                self._step(set(plan.step_checks), due)
                self._finish_checked()
            except Exception as exc:  # fail the batch, keep the server
                log.exception("engine step failed")
                for engine_id, g in list(self._running.items()):
                    self._stop(engine_id, g)
                    g.fail(exc)
                self._running.clear()
                self._answers.fail([job for job, _ in due], exc)
        self._engine_waiting = self.engine.num_waiting
        if self.metrics is not None:
            self.metrics.tokens.labels(kind="computed").inc(
                self.engine.stats.tokens_computed - computed
            )

    def _stop(self, engine_id: int, g: Job) -> None:
        """Take a generation out of the engine: its sequence and its output checks' slot."""
        self.engine.cancel(engine_id)
        if g.decoder is not None:
            self.runtime.generator.close_checks(g.decoder)

    def _classifier_pass(self, classify: list[Job], gated: list[Job]) -> set[int]:
        """One classifier pass for every classification due this tick: the classifications,
        the input moderation of `gated` generations (planned at the door) and the output checks
        kept. The keys of the generations that failed with it."""
        checks, self._checks = self._checks, []
        planned = [p for j in classify for p in j.planned or ()]
        planned += [g.prep.input_planned for g in gated if g.prep and g.prep.input_planned]
        planned += [c.planned for c in checks]
        try:
            results = self._run_classifier(planned) if planned else []
        except Exception as exc:
            log.exception("classifier pass failed")
            for job in [*classify, *gated, *(c.job for c in checks)]:
                job.fail(exc)
            return {g.key for g in gated}
        at = 0
        for cjob in classify:
            n = cjob.items
            cjob.reply(results[at : at + n])
            at += n
            self._answered(cjob, "classify")
        for g in gated:
            g.input_moderation = results[at]
            at += 1
        for check in checks:
            self._finish(check.job, check.finish_reason, results[at])
            at += 1
        return set()

    def _run_classifier(self, planned: list[PlannedItem]) -> list[Classification]:
        rt = self.runtime
        reused = self.engine.stats.prefix_tokens_reused
        results = rt.classifier.run(planned)
        if self.metrics is not None:
            self.metrics.batch_size.labels(kind="classify").observe(len(planned))
            delta = self.engine.stats.prefix_tokens_reused - reused
            if delta:
                self.metrics.prefix_hits.inc(len(planned))
                self.metrics.prefix_tokens.inc(delta)
        return results

    def _admit(self, g: Job) -> None:
        """Refuse a flagged input, otherwise queue the sequence into the engine."""
        rt = self.runtime
        assert g.prep is not None
        moderation = g.input_moderation
        if moderation is not None and moderation.flagged:
            g.reply(rt.generator.refuse_input(g.prep, moderation))
            return
        checks = None
        if g.prep.options.moderate_output and self.engine.max_batch_size >= 2:
            # (With one generation slot, open_checks declines: the answer is checked once, at
            # the end.)
            if not has_slots_for_checks(self.engine.free_slots, self.engine.num_waiting):
                self._slot_wait.append(g)
                return
            try:
                checks = rt.generator.open_checks(g.prep)
            except InvalidArgument as exc:
                g.fail(RuntimeError(f"output moderation failed: {exc.message[:200]}"))
                return
        decoder = AnswerDecoder(rt.tokenizer, g.prep, stream=g.stream, checks=checks)
        try:
            engine_id = self.engine.add_request(rt.generator.request(g.prep))
        except RequestError as exc:  # e.g. prompt + max_new_tokens beyond the context
            rt.generator.close_checks(decoder)
            g.fail(InvalidArgument("messages", str(exc)))
            return
        g.decoder, g.engine_id = decoder, engine_id
        self._running[engine_id] = g

    def _step(self, checks: set[int], answers: Due | None = None) -> None:
        """One engine step, with the checks the plan chose riding in its pass (they cover the
        tokens generated before it), ModerateStream's `answers` too: sends what passed, then
        the step's tokens."""
        rt = self.runtime
        due = [g for g in self._running.values() if g.key in checks]
        answers = answers or []
        events, deltas, verdicts = rt.generator.step_with(
            [g.decoder for g in due if g.decoder is not None], self._answers.streams(answers)
        )
        self._answers.checked(answers, verdicts)
        if self.metrics is not None and due:
            self.metrics.batch_size.labels(kind="stream_check").observe(len(due))
        if self.metrics is not None and answers:
            self.metrics.batch_size.labels(kind="answer_check").observe(len(answers))
        for job, delta in zip(due, deltas, strict=True):
            if delta:
                job.reply(delta)
        if self.metrics is not None and events:
            self.metrics.batch_size.labels(kind="generate").observe(len(events))
        for ev in events:
            g = self._running.get(ev.request_id)
            if g is None or g.prep is None or g.decoder is None:
                continue
            delta = g.decoder.push(ev)
            if delta:
                g.reply(delta)
            reason = g.decoder.finish_reason
            if reason is None or g.decoder.checks is not None:
                continue  # answers checked as they grow finish in _finish_checked
            del self._running[ev.request_id]
            if g.decoder.error is not None:  # this generation only; the others go on
                g.fail(GenerationFailedError(f"generation failed: {g.decoder.error}"))
                continue
            answer = g.decoder.answer
            if g.prep.options.moderate_output and not is_blank(answer):
                try:
                    planned = rt.classifier.plan_output(g.prep, answer)
                except InvalidArgument as exc:
                    # Never release an answer that could not be checked. `prepare` made sure
                    # there is room for it, so this is the server's fault, not the caller's.
                    g.fail(RuntimeError(f"output moderation failed: {exc.message[:200]}"))
                    continue
                self._checks.append(_OutputCheck(g, planned, reason))  # the next pass checks it
            else:
                self._finish(g, reason, None)

    def _finish_checked(self) -> None:
        """Stop the answers a check flagged and finish those generated and checked to the
        end (their last check rode in the tick after their last token)."""
        for engine_id, g in list(self._running.items()):
            d = g.decoder
            if d is None or d.checks is None or not d.done:
                continue
            del self._running[engine_id]
            self._stop(engine_id, g)  # a flagged answer leaves the engine before its end
            if d.error is not None:  # sampling failed: this generation only, nothing more sent
                g.fail(GenerationFailedError(f"generation failed: {d.error}"))
                continue
            self._finish(g, d.finish_reason or "length", None)

    def _finish(self, g: Job, reason: str, output: Classification | None) -> None:
        assert g.prep is not None and g.decoder is not None
        g.decoder.finish_reason = g.decoder.finish_reason or reason
        events = self.runtime.generator.finish_decoded(
            g.prep, g.decoder, g.input_moderation, output
        )
        for event in events:
            if g.stream or isinstance(event, GenerationResult):
                g.reply(event)
        self._answered(g, "generate")

    def _answered(self, job: Job, kind: str) -> None:
        if self.metrics is not None and job.started_at is not None:
            self.metrics.model_seconds.labels(kind=kind).observe(time.monotonic() - job.started_at)


def cache_in_use(engine: Any) -> tuple[int, int]:
    """Generation slots holding a sequence (an answer or its checks), and the tokens their
    cache rows hold (a slot holds at most its window)."""
    cache = engine.cache
    used = engine.max_batch_size - engine.free_slots
    tokens = sum(min(n, cache.window) for n in cache.lengths[: engine.max_batch_size])
    return used, tokens
