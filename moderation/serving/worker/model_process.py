"""The model in a process of its own, behind the same interface as the in-process worker.

Why: in one process the gRPC event loop and the model's thread share one GIL, and the model
loses most of a core winning it back after every torch call (docs/benchmarks.md has the runs).

The parent (the gRPC server) keeps a *front* (`moderation.serving.front`): the planner
(tokenizer, policies, limits), everything that validates a request at the door, but no weights.
The child (`moderation.serving.worker.model_child`) loads the model and runs the ordinary scheduler;
jobs cross a pipe already planned, answers and generation events come back, with the worker's
metrics, as typed messages (`moderation.serving.worker.process_messages`). Errors become the same
exception classes on this side, so the servicer maps
them to the same status codes. A model process that dies fails every call in flight with
UNAVAILABLE and marks the server NOT_SERVING (`on_exit`), so that Kubernetes restarts the pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass

import structlog

from moderation.core.decision import Classification, PlannedItem
from moderation.core.generation import GenerationResult, PreparedGeneration
from moderation.serving import tracing
from moderation.serving.calls import CallRecord, current_call
from moderation.serving.metrics import Metrics
from moderation.serving.settings import ServeSettings
from moderation.serving.worker import (
    CheckVerdict,
    QueuedCheck,
    QueueFullError,
    WorkerStoppedError,
    generation_events,
)
from moderation.serving.worker import process_messages as msg
from moderation.serving.worker.model_child import child_main
from moderation.serving.worker.pipe_writer import PipeWriter

log = structlog.get_logger(__name__)


class ModelProcessError(Exception):
    """The model process could not start."""


def replay(metrics: Metrics, ops: Sequence[msg.MetricOp]) -> None:
    """Apply the model process's metric updates to the server's metrics."""
    for op in ops:
        metric = getattr(metrics, op.metric)
        if op.labels:
            metric = metric.labels(**dict(op.labels))
        getattr(metric, op.method)(op.value)


@dataclass(eq=False)
class _Pending:
    future: asyncio.Future[list[Classification]] | None = None
    events: asyncio.Queue[str | GenerationResult | BaseException] | None = None
    verdicts: asyncio.Queue[CheckVerdict | BaseException] | None = None
    call: CallRecord | None = None  # the call's record, for its stage spans (tracing)


class _PipeCheckHandle(QueuedCheck):
    """The caller's side of a ModerateStream check in the model process."""

    def __init__(self, worker: ProcessWorker, job: int):
        super().__init__()
        self.worker = worker
        self.job = job

    def send_feed(self, tokens: list[int], end: bool) -> None:
        if self.job in self.worker._pending:
            self.worker._send(msg.Feed(self.job, tokens, end))

    def send_close(self) -> None:
        if self.worker._pending.pop(self.job, None) is not None:
            self.worker._send(msg.Cancel(self.job))  # nobody waits: free its slot


class ProcessWorker:
    """The server's side of the model process: a `Worker`."""

    def __init__(
        self,
        settings: ServeSettings,
        metrics: Metrics | None = None,
        *,
        on_exit: Callable[[], None] | None = None,
    ):
        self.settings = settings
        self.metrics = metrics
        self.max_queue = settings.max_queue
        self.on_exit = on_exit
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self._conn, child_conn = ctx.Pipe()
        self._process = ctx.Process(
            target=child_main, args=(child_conn, settings), name="moderation-model", daemon=True
        )
        self._child_conn = child_conn
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count()
        # The event loop's messages of one loop iteration go out together, one pickle and one
        # write (pipe_writer.py says why there is no sender thread).
        self._unsent: list[msg.ToModel] = []
        self._writer: PipeWriter | None = None  # once loaded, on the loop
        self._stopping = False
        self._dead: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_progress = time.monotonic()
        self._ping_sent: float | None = None  # a Ping not yet answered, when it was sent

    async def load(self) -> msg.ModelInfo:
        """Start the model process and wait until its model is loaded."""
        self._process.start()
        self._child_conn.close()  # ours is closed: EOF here when the child goes
        try:
            message = await asyncio.to_thread(self._conn.recv)
        except asyncio.CancelledError:  # stopped while loading: nothing to wait for
            self._process.kill()
            raise
        except (EOFError, OSError):
            self._process.join(5)
            raise ModelProcessError(
                f"the model process exited while loading (code {self._process.exitcode})"
            ) from None
        if not isinstance(message, msg.Ready):
            self._process.join(5)
            error = message.error if isinstance(message, msg.LoadFailed) else repr(message)
            raise ModelProcessError(f"the model process could not load the model: {error}")
        if self.metrics is not None and self._process.pid is not None:
            self.metrics.watch_model_process(self._process.pid)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._conn.fileno(), self._on_readable)
        self._writer = PipeWriter(self._conn.fileno(), self._loop, self._died)
        return message.info

    def start(self) -> None:
        """Nothing to do: `load` started the process (the `Worker` protocol)."""

    @property
    def last_progress(self) -> float:
        """When the model process last sent anything: an answer, metrics, its heartbeat while
        it works, or the Pong of the watchdog's Ping, idle or busy."""
        return self._last_progress

    def ping(self) -> None:
        """Ask the model process for a Pong (one Ping at a time: a stopped process does not
        pile them up in the pipe)."""
        if self._ping_sent is None and self._dead is None and not self._stopping:
            self._ping_sent = time.monotonic()
            self._send(msg.Ping())

    @property
    def queue_depth(self) -> int:
        """Requests in the model process, queued or running. An open ModerateStream check is
        not one: it may wait for its caller's text, with nothing for the model to do (the
        hang watchdog must not take that for a stalled model)."""
        return sum(1 for p in self._pending.values() if p.verdicts is None)

    def _send(self, message: msg.ToModel) -> None:
        """Queue a message for the model process (on the event loop). Never raises: a model
        process that is gone is for the reader to report."""
        self._unsent.append(message)
        if len(self._unsent) == 1 and self._loop is not None:
            self._loop.call_soon(self._hand_over)

    def _hand_over(self) -> None:
        unsent, self._unsent = self._unsent, []
        if self._writer is not None:
            self._writer.write(msg.Requests(unsent))

    def _admit(self) -> int:
        if self._dead is not None:
            raise WorkerStoppedError(self._dead)
        if self._stopping:
            raise WorkerStoppedError("the server is shutting down")
        if len(self._pending) >= self.max_queue:
            raise QueueFullError(
                f"the queue is full ({self.max_queue} requests waiting); retry later"
            )
        return next(self._ids)

    async def classify(
        self, planned: Sequence[PlannedItem], *, deadline: float | None = None
    ) -> list[Classification]:
        job = self._admit()
        pending = _Pending(future=asyncio.get_running_loop().create_future(), call=current_call())
        self._pending[job] = pending
        self._send(msg.Classify(job, list(planned), deadline))
        try:
            assert pending.future is not None
            return await pending.future
        except asyncio.CancelledError:
            if self._pending.pop(job, None) is not None:
                self._send(msg.Cancel(job))
            raise
        finally:
            self._pending.pop(job, None)

    async def generate(
        self, prep: PreparedGeneration, *, stream: bool, deadline: float | None = None
    ) -> AsyncGenerator[str | GenerationResult, None]:
        job = self._admit()
        pending = _Pending(events=asyncio.Queue(), call=current_call())
        self._pending[job] = pending
        self._send(msg.Generate(job, prep, stream, deadline))
        try:
            assert pending.events is not None
            async for event in generation_events(pending.events):
                yield event
        finally:
            if self._pending.pop(job, None) is not None:
                self._send(msg.Cancel(job))  # nobody waits: stop generating

    def check_answer(
        self, planned: PlannedItem, every: int, *, deadline: float | None = None
    ) -> _PipeCheckHandle:
        job = self._admit()
        handle = _PipeCheckHandle(self, job)
        self._pending[job] = _Pending(verdicts=handle.events)
        self._send(msg.CheckAnswer(job, planned, every, deadline))
        return handle

    def _on_readable(self) -> None:
        self._last_progress = time.monotonic()
        try:
            while self._conn.poll():
                message = self._conn.recv()
                for one in message.messages:
                    self._dispatch(one)
        except (EOFError, OSError):
            self._died()

    def _dispatch(self, message: msg.JobMessage | msg.MetricOps | msg.Pong) -> None:
        if isinstance(message, msg.Pong):
            self._ping_sent = None
            return
        if isinstance(message, msg.MetricOps):
            if self.metrics is not None:
                replay(self.metrics, message.ops)
            return
        pending = self._pending.get(message.job)
        if pending is None:  # cancelled meanwhile
            return
        if isinstance(message, msg.Results):
            self._pending.pop(message.job, None)
            tracing.model_stages(pending.call, message.timing)
            if pending.future is not None and not pending.future.done():
                pending.future.set_result(message.results)
        elif isinstance(message, msg.Event):
            event = message.event
            if isinstance(event, CheckVerdict):
                if pending.verdicts is not None:
                    pending.verdicts.put_nowait(event)
                    if event.complete or event.result.flagged:
                        self._pending.pop(message.job, None)
            elif pending.events is not None:
                pending.events.put_nowait(event)
                if isinstance(event, GenerationResult):
                    self._pending.pop(message.job, None)
                    tracing.model_stages(pending.call, message.timing)
        else:
            self._pending.pop(message.job, None)
            self._fail(pending, message.error.exception())

    @staticmethod
    def _fail(pending: _Pending, exc: BaseException) -> None:
        if pending.future is not None and not pending.future.done():
            pending.future.set_exception(exc)
        if pending.events is not None:
            pending.events.put_nowait(exc)
        if pending.verdicts is not None:
            pending.verdicts.put_nowait(exc)

    def _died(self) -> None:
        if self._dead is not None:  # reported already (the writer and the reader both see it)
            return
        if self._writer is not None:
            self._writer.close()
        if self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._conn.fileno())
        if self._stopping:
            # Asked to stop: the pipe closes before the process has finished exiting (that
            # takes a moment), and `stop` waits for it and reports a process that hangs.
            return
        self._process.join(1)
        code = self._process.exitcode
        self._dead = f"the model process exited (code {code}); the server must be restarted"
        log.error("model process exited", exitcode=code, in_flight=len(self._pending))
        for pending in list(self._pending.values()):
            self._fail(pending, WorkerStoppedError(self._dead))
        self._pending.clear()
        if self.on_exit is not None:
            self.on_exit()

    def _stop_message(self, stop: msg.Stop) -> None:
        """Send Stop from the calling thread: through the loop while it runs (its writer owns
        the pipe's writes), else directly (nothing else writes any more)."""
        loop = self._loop
        if loop is not None and loop.is_running():
            with contextlib.suppress(RuntimeError):  # closed meanwhile
                loop.call_soon_threadsafe(self._send, stop)
                return
        with contextlib.suppress(OSError, ValueError):  # gone: nothing to stop
            self._conn.send(msg.Requests([stop]))

    def stop(self, timeout: float | None = None) -> None:
        """Finish what the model process holds, then end it (called from a thread)."""
        self._stopping = True
        if self._process.is_alive():
            self._stop_message(msg.Stop(timeout or 0.0))
            self._process.join((timeout or 0.0) + 10)
        if self._process.is_alive():
            # It ignores SIGTERM (the server's to handle), so it takes SIGKILL.
            log.warning("model process did not stop in time; killing it")
            self._process.kill()
            self._process.join(10)
        elif self._process.exitcode not in (0, None):
            log.error("model process exited with an error", exitcode=self._process.exitcode)
