"""The model in this process: a thread runs the scheduler's ticks; callers await on their loop.

Results go back to the event loop with `call_soon_threadsafe`, once per tick and loop for all
of the tick's results: each call writes to the loop's wake-up pipe, and a batch of 32 answers
would otherwise wake the loop 32 times while it competes with this thread for the GIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from functools import partial
from typing import Any

from moderation.core.decision import Classification, PlannedItem
from moderation.core.generation import GenerationResult, PreparedGeneration
from moderation.runtime import Runtime
from moderation.serving import tracing
from moderation.serving.calls import current_call
from moderation.serving.metrics import Metrics
from moderation.serving.worker import QueuedCheck, generation_events
from moderation.serving.worker.answer_checks import CheckJob
from moderation.serving.worker.job import Job, Reply
from moderation.serving.worker.scheduler import Scheduler

Call = tuple[Callable[..., Any], tuple[Any, ...]]


class Outbox:
    """A tick's deliveries to event loops, sent together when the tick ends."""

    def __init__(self) -> None:
        self._calls: list[tuple[asyncio.AbstractEventLoop, Call]] = []

    def put(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
        self._calls.append((loop, (fn, args)))

    def flush(self) -> None:
        """One call_soon_threadsafe per event loop, the calls in order."""
        calls, self._calls = self._calls, []
        by_loop: dict[asyncio.AbstractEventLoop, list[Call]] = {}
        for loop, call in calls:
            by_loop.setdefault(loop, []).append(call)
        for loop, batch in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop closed: its callers are gone
                loop.call_soon_threadsafe(_deliver, batch)


def _deliver(calls: list[Call]) -> None:
    for fn, args in calls:
        fn(*args)


class _ThreadCheck(QueuedCheck):
    """The caller's side of a ModerateStream check in this process's scheduler."""

    def __init__(self, scheduler: Scheduler, outbox: Outbox, loop: asyncio.AbstractEventLoop):
        super().__init__()
        self.scheduler = scheduler
        self.job = CheckJob(partial(outbox.put, loop, self.events.put_nowait))

    def send_feed(self, tokens: list[int], end: bool) -> None:
        self.scheduler.feed(self.job, tokens, end)

    def send_close(self) -> None:
        self.scheduler.cancel(self.job)  # its slot is freed at the next tick


def _stages(job: Job) -> None:
    """The call's `queue` and `model` spans (tracing on), from the job's times."""
    if tracing.enabled() and job.started_at is not None:
        timing = (job.started_at - job.queued_at, time.monotonic() - job.started_at)
        tracing.model_stages(current_call(), timing)


class WorkerThread:
    """A `Worker` whose scheduler ticks on a thread of this process."""

    def __init__(
        self,
        runtime: Runtime,
        metrics: Metrics | None = None,
        *,
        max_queue: int = 1024,
        max_items_per_pass: int = 256,
        batch_wait: float = 0.0,
    ):
        self.scheduler = Scheduler(
            runtime,
            metrics,
            max_queue=max_queue,
            max_items_per_pass=max_items_per_pass,
            batch_wait=batch_wait,
        )
        self._outbox = Outbox()
        self._busy_since: float | None = None  # when the tick running now started
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Take no new work, finish what is queued and running, then end the thread."""
        self.scheduler.close()
        self._thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        return self.scheduler.queue_depth

    @property
    def last_progress(self) -> float:
        """Now while the thread waits for work (idle is alive); else when its tick started:
        a tick that never ends is the hang the watchdog looks for."""
        busy = self._busy_since
        return time.monotonic() if busy is None else busy

    def ping(self) -> None:
        """Nothing to ask: the thread's state is read directly (`last_progress`)."""

    def _run(self) -> None:
        while self.scheduler.wait_for_work():
            self._busy_since = time.monotonic()
            try:
                self.scheduler.run_once()
            finally:
                self._outbox.flush()
                self._busy_since = None

    async def classify(
        self, planned: Sequence[PlannedItem], *, deadline: float | None = None
    ) -> list[Classification]:
        """Results of planned items, in order, from a shared classifier pass."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Classification]] = loop.create_future()

        def settle(value: Reply) -> None:  # on the loop
            if future.done():
                return
            if isinstance(value, BaseException):
                future.set_exception(value)
            else:
                assert isinstance(value, list)
                future.set_result(value)

        job = Job.classify(list(planned), partial(self._outbox.put, loop, settle), deadline)
        self.scheduler.submit(job)
        try:
            results = await future
            _stages(job)
            return results
        except asyncio.CancelledError:  # the client cancelled or its deadline passed
            self.scheduler.cancel(job)
            raise

    async def generate(
        self, prep: PreparedGeneration, *, stream: bool, deadline: float | None = None
    ) -> AsyncGenerator[str | GenerationResult, None]:
        """Text deltas (when `stream`), then the result; the engine batches it with others."""
        events: asyncio.Queue[str | GenerationResult | BaseException] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job = Job.generate(
            prep,
            partial(self._outbox.put, loop, events.put_nowait),
            stream=stream,
            deadline=deadline,
        )
        self.scheduler.submit(job)
        try:
            async for event in generation_events(events):
                if isinstance(event, GenerationResult):
                    _stages(job)
                yield event
        finally:
            self.scheduler.cancel(job)  # a no-op once finished; otherwise stop generating

    def check_answer(
        self, planned: PlannedItem, every: int, *, deadline: float | None = None
    ) -> _ThreadCheck:
        """Open a ModerateStream check; its verdicts come from the scheduler's ticks."""
        handle = _ThreadCheck(self.scheduler, self._outbox, asyncio.get_running_loop())
        handle.job.planned, handle.job.every, handle.job.deadline = planned, every, deadline
        self.scheduler.open_check(handle.job)
        return handle
