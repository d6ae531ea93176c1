"""The model in a process of its own, behind the same interface as the in-process worker.

Why: in one process, the gRPC event loop and the model worker thread share one GIL. Every torch
call the worker makes releases it and has to win it back from the event loop, which costs the
model most of a core under load (measured on 2 cores: one torch thread in the server process
gives 426-598 decisions/s at 32 callers; the same model in a process of its own 843-948/s).

The parent (the gRPC server) keeps a *front* runtime: tokenizer, policies, classifier planning
and generation preparation, everything that validates a request at the door, but no weights.
The child loads the model and runs the ordinary `ModelWorker`; jobs cross a pipe already
planned, answers and generation events come back, with the worker's metrics. Errors cross as
(kind, field, message) and become the same exception classes on this side, so the servicer maps
them to the same status codes. A model process that dies fails every call in flight with
UNAVAILABLE and marks the server NOT_SERVING (`on_exit`), so that Kubernetes restarts the pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

import structlog

from model.args import ModelArgs
from moderation.classifier import Classification, ClassificationError
from moderation.guarded import GenerationResult, PreparedGeneration
from moderation.metrics import Metrics
from moderation.runtime import Runtime, assemble_runtime, load_policies
from moderation.settings import ServeSettings
from moderation.worker import (
    ClassifyJob,
    DeadlineExpiredError,
    GenerateJob,
    Job,
    ModelWorker,
    QueueFullError,
    WorkerStoppedError,
    generation_events,
)

log = structlog.get_logger(__name__)

METRICS_FLUSH_S = 0.25  # how often the model process sends its metrics when it has any


class ModelProcessError(Exception):
    """The model process could not start."""


# --------------------------------------------------------------------- the front runtime


@dataclass
class _Backend:
    name: str


@dataclass
class EngineInfo:
    """What the front needs to know of the engine in the model process: its limits (planning
    splits long texts by them) and what GetModelInfo reports."""

    args: ModelArgs
    window: int
    max_context: int | None
    backend: _Backend


@dataclass
class ModelInfo:
    """Sent by the model process once its model is loaded."""

    folder: str
    model_id: str
    demo: bool
    device: str
    dtype: str
    engine: EngineInfo


def front_runtime(info: ModelInfo, settings: ServeSettings) -> Runtime:
    """Tokenizer, policies, planning and preparation, as in the model process, without weights."""
    from model import Tokenizer

    return assemble_runtime(
        info.engine,  # planning reads only its limits
        Tokenizer.from_file(Path(info.folder)),
        model_id=info.model_id,
        demo=info.demo,
        device=info.device,
        dtype=info.dtype,
        policies=load_policies(settings.policy_files),
        default_policy=settings.policy,
        threshold=settings.threshold,
        long_text=settings.long_text,
        max_new_tokens_limit=settings.max_new_tokens,
    )


# ------------------------------------------------------------------ errors over the pipe

_KINDS: dict[str, type[Exception]] = {
    "queue_full": QueueFullError,
    "deadline": DeadlineExpiredError,
    "stopped": WorkerStoppedError,
}


def _error_message(exc: BaseException) -> tuple[str, str | None, str]:
    if isinstance(exc, ClassificationError):
        return "invalid", exc.field, exc.message
    for kind, cls in _KINDS.items():
        if isinstance(exc, cls):
            return kind, None, str(exc)
    return "internal", None, f"{type(exc).__name__}: {exc}"


def _error_from(kind: str, field: str | None, message: str) -> Exception:
    if kind == "invalid":
        return ClassificationError(field or "request", message)
    cls = _KINDS.get(kind)
    return cls(message) if cls is not None else RuntimeError(message)


# ----------------------------------------------------------------------- metrics over the pipe


class _Recorder:
    """Stands in for one Prometheus metric in the model process: records what is done to it."""

    def __init__(self, name: str, ops: list[Any], labels: tuple[tuple[str, str], ...] = ()):
        self._name, self._ops, self._labels = name, ops, labels

    def labels(self, **labels: str) -> _Recorder:
        return _Recorder(self._name, self._ops, tuple(sorted(labels.items())))

    def inc(self, amount: float = 1) -> None:
        self._ops.append((self._name, self._labels, "inc", amount))

    def set(self, value: float) -> None:
        self._ops.append((self._name, self._labels, "set", value))

    def observe(self, value: float) -> None:
        self._ops.append((self._name, self._labels, "observe", value))


class RecordingMetrics:
    """The worker's metrics, recorded in the model process and replayed in the server's."""

    def __init__(self) -> None:
        self.ops: list[Any] = []
        for name in ("queue_depth", "running_sequences", "batch_size", "tokens", "prefix_hits",
                     "prefix_tokens"):  # fmt: skip
            setattr(self, name, _Recorder(name, self.ops))

    def take(self) -> list[Any]:
        taken = self.ops[:]  # the worker thread appends meanwhile: take a prefix, then drop it
        del self.ops[: len(taken)]
        return taken


def replay(metrics: Metrics, ops: Sequence[Any]) -> None:
    for name, labels, method, value in ops:
        metric = getattr(metrics, name)
        if labels:
            metric = metric.labels(**dict(labels))
        getattr(metric, method)(value)


# --------------------------------------------------------------------------- the child


def _child_main(conn: Connection, settings: ServeSettings) -> None:
    """Entry point of the model process."""
    # The server process owns the signals (SIGTERM drains it, then it stops us); a Ctrl-C in
    # a terminal reaches the whole process group and must not kill the model mid-drain.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from moderation.logs import configure_logging
    from moderation.runtime import demo_checkpoint_dir
    from moderation.server import load_from_settings

    configure_logging(settings.log_level)
    import torch

    threads = settings.torch_threads or max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(threads)
    try:
        runtime = load_from_settings(settings)
        folder = settings.model or str(demo_checkpoint_dir())
    except Exception as exc:  # the server reports it and exits
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    engine = runtime.engine
    conn.send(("ready", ModelInfo(
        folder=folder, model_id=runtime.model_id, demo=runtime.demo,
        device=runtime.device, dtype=runtime.dtype,
        engine=EngineInfo(engine.args, engine.window, engine.max_context,
                          _Backend(engine.backend.name)),
    )))  # fmt: skip
    _Child(conn, runtime, settings).run()


class _Sink:
    """Where the model process's jobs put their answers; sent once per tick."""

    def __init__(self) -> None:
        self.outbox: list[Any] = []
        self.open: dict[int, Job] = {}  # jobs with answers still to come

    def put(self, job: int, message: tuple[Any, ...], *, final: bool) -> None:
        self.outbox.append(message)
        if final:
            self.open.pop(job, None)


@dataclass(eq=False)
class _PipeClassify(ClassifyJob):
    """A classification whose answer goes back over the pipe."""

    job: int = 0
    sink: _Sink | None = None

    def resolve(self, value: list[Classification] | BaseException) -> None:
        assert self.sink is not None
        if isinstance(value, BaseException):
            self.sink.put(self.job, ("error", self.job, *_error_message(value)), final=True)
        else:
            self.sink.put(self.job, ("result", self.job, value), final=True)


@dataclass(eq=False)
class _PipeGenerate(GenerateJob):
    """A generation whose events go back over the pipe."""

    job: int = 0
    sink: _Sink | None = None

    def emit(self, event: str | GenerationResult | BaseException) -> None:
        assert self.sink is not None
        if isinstance(event, BaseException):
            self.sink.put(self.job, ("error", self.job, *_error_message(event)), final=True)
        else:
            final = isinstance(event, GenerationResult)
            self.sink.put(self.job, ("event", self.job, event), final=final)


class _Child:
    """The model process's main loop: it runs the worker's ticks itself, with no thread or
    event loop between the pipe and the engine (each hand-off costs a lone caller latency)."""

    def __init__(self, conn: Connection, runtime: Runtime, settings: ServeSettings):
        self.conn = conn
        self.metrics = RecordingMetrics()
        self.worker = ModelWorker(
            runtime,
            cast(Any, self.metrics),
            max_queue=1 << 30,  # the server process bounds the queue
            max_items_per_pass=settings.max_batch_items,
        )
        self.sink = _Sink()
        self.stop_at: float | None = None  # set by "stop": finish the work, at the latest then

    def run(self) -> None:
        last_metrics = time.monotonic()
        while True:
            try:
                # Idle: sleep in poll until a message comes (or it is time for metrics).
                if self.conn.poll(0 if self.worker.has_work else METRICS_FLUSH_S):
                    while self.conn.poll():
                        self._handle(self.conn.recv())
            except (EOFError, OSError):  # the server process is gone: nobody to answer
                return
            if self.worker.has_work:
                self.worker.run_once()
            now = time.monotonic()
            if now - last_metrics >= METRICS_FLUSH_S:
                last_metrics = now
                ops = self.metrics.take()
                if ops:
                    self.sink.outbox.append(("metrics", ops))
            if self.sink.outbox:
                messages, self.sink.outbox = self.sink.outbox, []
                self._send(("batch", messages))
            if self.stop_at is not None and (not self.worker.has_work or now >= self.stop_at):
                self._send(("batch", [("metrics", self.metrics.take())]))
                return

    def _send(self, message: Any) -> None:
        with contextlib.suppress(OSError):  # the server is gone: nothing to tell
            self.conn.send(message)

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        job: Job
        if kind == "classify":
            _, number, planned, deadline = message
            job = _PipeClassify(
                cast(Any, None), deadline, planned=planned, job=number, sink=self.sink
            )
        elif kind == "generate":
            _, number, prep, stream, deadline = message
            job = _PipeGenerate(
                cast(Any, None), deadline, prep=prep, stream=stream, job=number, sink=self.sink
            )
        elif kind == "cancel":
            old = self.sink.open.pop(message[1], None)
            if old is not None:
                self.worker.cancel(old)  # dropped if queued, stopped at the next tick if running
            return
        elif kind == "stop":
            self.stop_at = time.monotonic() + message[1]
            return
        else:
            return
        self.sink.open[number] = job
        self.worker.submit(job)


# -------------------------------------------------------------------------- the parent


@dataclass(eq=False)
class _Pending:
    future: asyncio.Future[list[Classification]] | None = None
    events: asyncio.Queue[str | GenerationResult | BaseException] | None = None


class ProcessWorker:
    """The server's side of the model process; the interface of `ModelWorker`."""

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
            target=_child_main, args=(child_conn, settings), name="moderation-model", daemon=True
        )
        self._child_conn = child_conn
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count()
        # Messages go out from a thread of their own: a send blocks when the pipe is full (the
        # model busy with a long pass), and the event loop must keep answering meanwhile.
        self._outgoing: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="model-pipe", daemon=True)
        self._stopping = False
        self._dead: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def load(self) -> ModelInfo:
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
        if message[0] != "ready":
            self._process.join(5)
            raise ModelProcessError(f"the model process could not load the model: {message[1]}")
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._conn.fileno(), self._on_readable)
        self._sender.start()
        return cast(ModelInfo, message[1])

    def start(self) -> None:
        """Nothing to do: `load` started the process (the interface of ModelWorker)."""

    @property
    def queue_depth(self) -> int:
        """Requests in the model process, queued or running."""
        return len(self._pending)

    def _send(self, *message: Any) -> None:
        # Never raises: a model process that is gone is for the reader to report.
        self._outgoing.put(message)

    def _send_loop(self) -> None:
        while (message := self._outgoing.get()) is not None:
            try:
                self._conn.send(message)
            except (OSError, ValueError):  # the model process is gone: the reader reports it
                return

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
        self, planned: Sequence[Any], *, deadline: float | None = None
    ) -> list[Classification]:
        job = self._admit()
        pending = _Pending(future=asyncio.get_running_loop().create_future())
        self._pending[job] = pending
        self._send("classify", job, list(planned), deadline)
        try:
            assert pending.future is not None
            return await pending.future
        except asyncio.CancelledError:
            if self._pending.pop(job, None) is not None:
                self._send("cancel", job)
            raise
        finally:
            self._pending.pop(job, None)

    async def generate(
        self, prep: PreparedGeneration, *, stream: bool, deadline: float | None = None
    ) -> AsyncGenerator[str | GenerationResult, None]:
        job = self._admit()
        pending = _Pending(events=asyncio.Queue())
        self._pending[job] = pending
        self._send("generate", job, prep, stream, deadline)
        try:
            assert pending.events is not None
            async for event in generation_events(pending.events):
                yield event
        finally:
            if self._pending.pop(job, None) is not None:
                self._send("cancel", job)  # nobody waits: stop generating

    def _on_readable(self) -> None:
        try:
            while self._conn.poll():
                message = self._conn.recv()
                for one in message[1] if message[0] == "batch" else [message]:
                    self._dispatch(one)
        except (EOFError, OSError):
            self._died()

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "metrics":
            if self.metrics is not None:
                replay(self.metrics, message[1])
            return
        pending = self._pending.get(message[1])
        if pending is None:  # cancelled meanwhile
            return
        if kind == "result":
            self._pending.pop(message[1], None)
            if pending.future is not None and not pending.future.done():
                pending.future.set_result(message[2])
        elif kind == "event":
            if pending.events is not None:
                pending.events.put_nowait(message[2])
                if isinstance(message[2], GenerationResult):
                    self._pending.pop(message[1], None)
        elif kind == "error":
            self._pending.pop(message[1], None)
            self._fail(pending, _error_from(*message[2:]))

    @staticmethod
    def _fail(pending: _Pending, exc: BaseException) -> None:
        if pending.future is not None and not pending.future.done():
            pending.future.set_exception(exc)
        if pending.events is not None:
            pending.events.put_nowait(exc)

    def _died(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._conn.fileno())
        self._process.join(1)
        code = self._process.exitcode
        if self._stopping and code == 0:
            return
        self._dead = f"the model process exited (code {code}); the server must be restarted"
        log.error("model process exited", exitcode=code, in_flight=len(self._pending))
        for pending in list(self._pending.values()):
            self._fail(pending, WorkerStoppedError(self._dead))
        self._pending.clear()
        if self.on_exit is not None:
            self.on_exit()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what the model process holds, then end it (called from a thread)."""
        self._stopping = True
        if self._process.is_alive():
            self._send("stop", timeout or 0.0)
            self._process.join((timeout or 0.0) + 10)
        self._outgoing.put(None)  # ends the sender
        if self._process.is_alive():
            # It ignores SIGTERM (the server's to handle), so it takes SIGKILL.
            log.warning("model process did not stop in time; killing it")
            self._process.kill()
            self._process.join(10)
