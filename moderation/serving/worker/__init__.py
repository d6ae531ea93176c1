"""What the servicer drives: a worker that runs planned work on the model, and its errors.

Two implementations: `WorkerThread` (the model in this process, on a thread of its own) and
`ProcessWorker` (the model in a process of its own). The servicer sees only this protocol.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Protocol

from moderation.core.decision import Classification, PlannedItem
from moderation.core.generation import GenerationResult, PreparedGeneration


class QueueFullError(Exception):
    """The worker already holds max_queue waiting requests."""


class WorkerStoppedError(Exception):
    """The worker is shutting down (or its model process died) and takes no new work."""


class DeadlineExpiredError(Exception):
    """The caller's deadline passed before the work was done."""


class GenerationFailedError(Exception):
    """The engine could not continue this one generation (its next token could not be
    sampled); the other generations of its batch went on. The message says why."""


@dataclass(frozen=True)
class CheckVerdict:
    """A ModerateStream check's answer: the verdict on the answer's first `checked_tokens`
    tokens; `complete` once they are all of it (the caller said it was done)."""

    checked_tokens: int
    result: Classification
    complete: bool


class AnswerCheck(Protocol):
    """One open ModerateStream check in the worker (`Worker.check_answer`)."""

    def feed(self, tokens: Sequence[int], *, end: bool = False) -> None:
        """The answer's next tokens (`end`: they are the last)."""
        ...

    async def verdict(self) -> CheckVerdict:
        """The next verdict; raises what ended the check."""
        ...

    def fail(self, exc: BaseException) -> None:
        """End the check from the caller's side: `verdict` raises `exc`."""
        ...

    def close(self) -> None:
        """Nobody waits any more: free the check's slot (a no-op once closed)."""
        ...


class Worker(Protocol):
    """Runs planned classifications and prepared generations on the model, batched."""

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the model."""
        ...

    @property
    def last_progress(self) -> float:
        """`time.monotonic()` when the model last showed it is alive (an answer, a heartbeat,
        the answer to `ping`; now, for a thread waiting for work): this long ago, whatever
        is queued and whatever the callers' deadlines, the model is hung."""
        ...

    def ping(self) -> None:
        """Ask the model for a sign of life, which moves `last_progress` when it comes."""
        ...

    def start(self) -> None: ...

    def stop(self, timeout: float | None = None) -> None:
        """Take no new work, finish what is queued and running (called from a thread)."""
        ...

    async def classify(
        self, planned: Sequence[PlannedItem], *, deadline: float | None = None
    ) -> list[Classification]:
        """Results of planned items, in order."""
        ...

    def generate(
        self, prep: PreparedGeneration, *, stream: bool, deadline: float | None = None
    ) -> AsyncGenerator[str | GenerationResult, None]:
        """Text deltas (when `stream`), then the result."""
        ...

    def check_answer(
        self, planned: PlannedItem, every: int, *, deadline: float | None = None
    ) -> AnswerCheck:
        """Open a ModerateStream check of an answer after `planned` (see
        Planner.plan_answer_stream), checked every `every` tokens."""
        ...


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


class QueuedCheck:
    """An `AnswerCheck`'s caller side: verdicts and errors arrive on an asyncio queue (both
    workers deliver there); `send_feed` and `send_close` reach the model."""

    def __init__(self) -> None:
        self.events: asyncio.Queue[CheckVerdict | BaseException] = asyncio.Queue()
        self.closed = False

    def feed(self, tokens: Sequence[int], *, end: bool = False) -> None:
        if not self.closed:
            self.send_feed(list(tokens), end)

    async def verdict(self) -> CheckVerdict:
        event = await self.events.get()
        if isinstance(event, BaseException):
            raise event
        return event

    def fail(self, exc: BaseException) -> None:
        self.events.put_nowait(exc)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.send_close()

    def send_feed(self, tokens: list[int], end: bool) -> None:
        raise NotImplementedError

    def send_close(self) -> None:
        raise NotImplementedError
