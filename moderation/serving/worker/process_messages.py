"""The messages between the server process and the model process: one frozen dataclass per
kind, pickled over a `multiprocessing` pipe. Errors cross as `WireError` and become the same
exception classes on the other side, so the servicer maps them to the same status codes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moderation.core.decision import Classification, PlannedItem
from moderation.core.errors import InvalidArgument
from moderation.core.generation import GenerationResult, PreparedGeneration
from moderation.runtime import ModelDescription
from moderation.serving.worker import (
    CheckVerdict,
    DeadlineExpiredError,
    GenerationFailedError,
    QueueFullError,
    WorkerStoppedError,
)
from moderation.serving.worker.job import Reply

# ------------------------------------------------------------- server -> model process


@dataclass(frozen=True)
class Classify:
    job: int
    planned: list[PlannedItem]
    deadline: float | None


@dataclass(frozen=True)
class Generate:
    job: int
    prep: PreparedGeneration
    stream: bool
    deadline: float | None


@dataclass(frozen=True)
class CheckAnswer:
    """Open a ModerateStream check."""

    job: int
    planned: PlannedItem
    every: int
    deadline: float | None


@dataclass(frozen=True)
class Feed:
    """A ModerateStream check's next tokens (`end`: the last)."""

    job: int
    tokens: list[int]
    end: bool


@dataclass(frozen=True)
class Cancel:
    """Nobody waits for this job any more."""

    job: int


@dataclass(frozen=True)
class Stop:
    """Finish the work held, within `timeout` seconds, then exit."""

    timeout: float


@dataclass(frozen=True)
class Ping:
    """Answer with a Pong between two passes, idle or busy: the server's watchdog expects it."""


ToModel = Classify | Generate | CheckAnswer | Feed | Cancel | Stop | Ping


@dataclass(frozen=True)
class Requests:
    """The messages queued while the last send ran, sent together."""

    messages: list[ToModel]


# ------------------------------------------------------------- model process -> server


@dataclass(frozen=True)
class ModelInfo:
    """What the front needs of the loaded model: where its tokenizer is, and its description
    (limits included)."""

    folder: str
    model: ModelDescription


@dataclass(frozen=True)
class Ready:
    info: ModelInfo


@dataclass(frozen=True)
class LoadFailed:
    error: str


@dataclass(frozen=True)
class Results:
    """A classification job's results, in order."""

    job: int
    results: list[Classification]
    timing: tuple[float, float] | None = None  # (queued, in the model) seconds, with tracing


@dataclass(frozen=True)
class Event:
    """A generation's text delta, or its result (the last event); or a check's verdict."""

    job: int
    event: str | GenerationResult | CheckVerdict
    timing: tuple[float, float] | None = None  # the result's (queued, in the model), tracing


@dataclass(frozen=True)
class WireError:
    kind: str  # "invalid", "queue_full", "deadline", "stopped", "generation_failed", "internal"
    message: str
    field: str | None = None

    _KINDS: ClassVar[dict[str, type[Exception]]] = {
        "queue_full": QueueFullError,
        "deadline": DeadlineExpiredError,
        "stopped": WorkerStoppedError,
        "generation_failed": GenerationFailedError,
    }

    @classmethod
    def of(cls, exc: BaseException) -> WireError:
        if isinstance(exc, InvalidArgument):
            return cls("invalid", exc.message, exc.field)
        for kind, error in cls._KINDS.items():
            if isinstance(exc, error):
                return cls(kind, str(exc))
        return cls("internal", f"{type(exc).__name__}: {exc}")

    def exception(self) -> Exception:
        if self.kind == "invalid":
            return InvalidArgument(self.field or "request", self.message)
        error = self._KINDS.get(self.kind)
        return error(self.message) if error is not None else RuntimeError(self.message)


@dataclass(frozen=True)
class Failed:
    job: int
    error: WireError


def job_message(
    job: int, reply: Reply, timing: tuple[float, float] | None = None
) -> tuple[JobMessage, bool]:
    """A job's reply as the message that carries it, and whether it is the job's last (its
    answer carries `timing`, the queue and model seconds, for tracing)."""
    if isinstance(reply, BaseException):
        return Failed(job, WireError.of(reply)), True
    if isinstance(reply, list):
        return Results(job, reply, timing), True
    final = isinstance(reply, GenerationResult)
    return Event(job, reply, timing if final else None), final


@dataclass(frozen=True)
class MetricOp:
    """One update of a scheduler metric, recorded in the model process."""

    metric: str
    labels: tuple[tuple[str, str], ...]
    method: str  # "inc", "set" or "observe"
    value: float


@dataclass(frozen=True)
class MetricOps:
    ops: list[MetricOp]


@dataclass(frozen=True)
class Pong:
    """The answer to a Ping: the model process's loop is turning."""


JobMessage = Results | Event | Failed


@dataclass(frozen=True)
class Batch:
    """A tick's messages, sent together."""

    messages: list[JobMessage | MetricOps | Pong]
