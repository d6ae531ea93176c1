"""The model process's side: load the model, then run the scheduler's ticks on the pipe's jobs.

There is no thread or event loop between the pipe and the engine: each hand-off would cost a
lone caller latency. Answers of a tick go back together, as one `Batch`.
"""

from __future__ import annotations

import contextlib
import signal
import time
from functools import partial
from multiprocessing.connection import Connection

from moderation.core.cpus import available_cpus
from moderation.runtime import Runtime, checkpoint_dir
from moderation.serving import interpreter
from moderation.serving.logs import configure_logging
from moderation.serving.metrics import WORKER_METRICS
from moderation.serving.settings import ServeSettings
from moderation.serving.worker import CheckVerdict
from moderation.serving.worker import process_messages as msg
from moderation.serving.worker.answer_checks import CheckJob
from moderation.serving.worker.job import Job, Reply
from moderation.serving.worker.loader import load_from_settings
from moderation.serving.worker.scheduler import Scheduler

METRICS_FLUSH_S = 0.25  # how often the model process sends its metrics when it has any


class _Recorder:
    """Stands in for one Prometheus metric in the model process: records what is done to it."""

    def __init__(
        self, name: str, ops: list[msg.MetricOp], labels: tuple[tuple[str, str], ...] = ()
    ):
        self._name, self._ops, self._labels = name, ops, labels

    def labels(self, **labels: str) -> _Recorder:
        return _Recorder(self._name, self._ops, tuple(sorted(labels.items())))

    def inc(self, amount: float = 1) -> None:
        self._ops.append(msg.MetricOp(self._name, self._labels, "inc", amount))

    def set(self, value: float) -> None:
        self._ops.append(msg.MetricOp(self._name, self._labels, "set", value))

    def observe(self, value: float) -> None:
        self._ops.append(msg.MetricOp(self._name, self._labels, "observe", value))


class RecordingMetrics:
    """The scheduler's metrics (`WorkerMetrics`), recorded here and replayed in the server."""

    def __init__(self) -> None:
        self.ops: list[msg.MetricOp] = []

    def __getattr__(self, name: str) -> _Recorder:
        if name not in WORKER_METRICS:
            raise AttributeError(name)
        return _Recorder(name, self.ops)

    def take(self) -> list[msg.MetricOp]:
        taken = self.ops[:]
        del self.ops[: len(taken)]
        return taken


def answer_timing(job: Job, *, timed: bool) -> tuple[float, float] | None:
    """What an answer carries for tracing (`timed`): its job's queue and model seconds."""
    if not timed or job.started_at is None:
        return None
    return job.started_at - job.queued_at, time.monotonic() - job.started_at


def child_main(conn: Connection, settings: ServeSettings) -> None:
    """Entry point of the model process."""
    # The server process owns the signals (SIGTERM drains it, then it stops us); a Ctrl-C in
    # a terminal reaches the whole process group and must not kill the model mid-drain.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(settings.log_level)
    import torch

    # The CPUs the pod may use (its cgroup quota, not the host's cores), less one for the
    # gRPC process.
    torch.set_num_threads(settings.torch_threads or max(1, available_cpus() - 1))
    try:
        runtime = load_from_settings(settings)
        folder = str(checkpoint_dir(settings.runtime_settings()))
    except Exception as exc:  # the server reports it and exits
        conn.send(msg.LoadFailed(f"{type(exc).__name__}: {exc}"))
        return
    # The engine's thread must not stop for full collections over torch's own objects.
    interpreter.freeze_start_up_objects()
    conn.send(msg.Ready(msg.ModelInfo(folder, runtime.description)))
    _Child(conn, runtime, settings).run()


class _Child:
    """The model process's main loop: it runs the scheduler's ticks itself."""

    def __init__(self, conn: Connection, runtime: Runtime, settings: ServeSettings):
        self.conn = conn
        self.metrics = RecordingMetrics()
        self.scheduler = Scheduler(
            runtime,
            self.metrics,
            max_queue=1 << 30,  # the server process bounds the queue
            max_items_per_pass=settings.max_batch_items,
            batch_wait=settings.batch_wait_ms / 1000,
        )
        self.outbox: list[msg.JobMessage | msg.MetricOps | msg.Pong] = []  # sent once per tick
        self.open: dict[int, Job | CheckJob] = {}  # jobs with answers still to come
        self.timed = settings.tracing  # answers carry their queue and model seconds
        self.stop_at: float | None = None  # set by Stop: finish the work, at the latest then
        self.last_sent = time.monotonic()

    def run(self) -> None:
        last_metrics = time.monotonic()
        while True:
            try:
                # Idle: sleep in poll until a message comes (or it is time for metrics); with
                # a batch wait, until more requests come to fill the pass (or it is time).
                gather = self.scheduler.gather_wait() if self.stop_at is None else 0.0
                timeout = gather if self.scheduler.has_work else METRICS_FLUSH_S
                if self.conn.poll(timeout):
                    while self.conn.poll():
                        for message in self.conn.recv().messages:
                            self._handle(message)
                    if self.stop_at is None and self.scheduler.gather_wait() > 0:
                        continue  # still filling: poll again for the rest of the wait
            except (EOFError, OSError):  # the server process is gone: nobody to answer
                return
            if self.scheduler.has_work:
                self.scheduler.run_once()
            now = time.monotonic()
            if now - last_metrics >= METRICS_FLUSH_S:
                last_metrics = now
                ops = self.metrics.take()
                if ops:
                    self.outbox.append(msg.MetricOps(ops))
            if self.outbox or (self.scheduler.has_work and now - self.last_sent >= METRICS_FLUSH_S):
                # An empty batch is a heartbeat: the server's watchdog sees the model working.
                messages, self.outbox = self.outbox, []
                self._send(msg.Batch(messages))
                self.last_sent = now
            if self.stop_at is not None and (not self.scheduler.has_work or now >= self.stop_at):
                self._send(msg.Batch([msg.MetricOps(self.metrics.take())]))
                return

    def _send(self, message: msg.Batch) -> None:
        with contextlib.suppress(OSError):  # the server is gone: nothing to tell
            self.conn.send(message)

    def _timing(self, job_id: int) -> tuple[float, float] | None:
        job = self.open.get(job_id)
        return None if not isinstance(job, Job) else answer_timing(job, timed=self.timed)

    def _verdict(self, job: int, reply: CheckVerdict | BaseException) -> None:
        """A ModerateStream check's verdict (or error) to the pipe."""
        if isinstance(reply, BaseException):
            self.outbox.append(msg.Failed(job, msg.WireError.of(reply)))
            final = True
        else:
            self.outbox.append(msg.Event(job, reply))
            final = reply.complete or reply.result.flagged
        if final:
            self.open.pop(job, None)

    def _reply(self, job: int, reply: Reply) -> None:
        message, final = msg.job_message(job, reply, self._timing(job))
        self.outbox.append(message)
        if final:
            self.open.pop(job, None)

    def _handle(self, message: msg.ToModel) -> None:
        job: Job
        if isinstance(message, msg.Classify):
            reply = partial(self._reply, message.job)
            job = Job.classify(message.planned, reply, message.deadline)
        elif isinstance(message, msg.Generate):
            reply = partial(self._reply, message.job)
            job = Job.generate(
                message.prep, reply, stream=message.stream, deadline=message.deadline
            )
        elif isinstance(message, msg.CheckAnswer):
            check = CheckJob(
                partial(self._verdict, message.job),
                message.deadline,
                planned=message.planned,
                every=message.every,
            )
            self.open[message.job] = check
            self.scheduler.open_check(check)
            return
        elif isinstance(message, msg.Feed):
            fed = self.open.get(message.job)
            if isinstance(fed, CheckJob):
                self.scheduler.feed(fed, message.tokens, message.end)
            return
        elif isinstance(message, msg.Cancel):
            old = self.open.pop(message.job, None)
            if old is not None:
                self.scheduler.cancel(old)  # dropped if queued, stopped at the next tick
            return
        elif isinstance(message, msg.Ping):
            # Answered between passes, so a pass that never ends (or a stopped process)
            # leaves the ping unanswered: what the server's watchdog looks for.
            self.outbox.append(msg.Pong())
            return
        else:
            self.stop_at = time.monotonic() + message.timeout
            return
        self.open[message.job] = job
        self.scheduler.submit(job)
