"""One caller's work for the scheduler, whichever transport brought it: planned classifications
or a prepared generation, and the callback its answers go to.

The worker thread's callback hands them to the caller's event loop, the model process's sends
them over the pipe; the scheduler only calls `reply`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from moderation.core.decision import Classification, PlannedItem
from moderation.core.generation import GenerationResult, PreparedGeneration
from moderation.core.guarded import AnswerDecoder

Reply = list[Classification] | str | GenerationResult | BaseException
"""A classification's results (once), a generation's text delta, its result (last), or the
error that ends either."""

_keys = itertools.count()


@dataclass(eq=False)  # identity equality: jobs are removed from the queue by identity
class Job:
    reply: Callable[[Reply], None]
    planned: list[PlannedItem] | None = None  # a classification: its items, planned at the door
    prep: PreparedGeneration | None = None  # a generation
    stream: bool = True  # a generation's text deltas are sent (unary Generate needs the result)
    deadline: float | None = None  # time.monotonic() after which nobody waits for the answer
    cancelled: bool = False
    key: int = field(default_factory=lambda: next(_keys))  # its name in a tick plan
    queued_at: float = field(default_factory=time.monotonic)  # for the queue wait metric
    started_at: float | None = None  # the tick that took it (time in the model from there)
    # Set by the scheduler while a generation runs.
    decoder: AnswerDecoder | None = None
    engine_id: int | None = None
    input_moderation: Classification | None = None

    @classmethod
    def classify(
        cls,
        planned: list[PlannedItem],
        reply: Callable[[Reply], None],
        deadline: float | None = None,
    ) -> Job:
        return cls(reply, planned=planned, deadline=deadline)

    @classmethod
    def generate(
        cls,
        prep: PreparedGeneration,
        reply: Callable[[Reply], None],
        *,
        stream: bool,
        deadline: float | None = None,
    ) -> Job:
        return cls(reply, prep=prep, stream=stream, deadline=deadline)

    @property
    def items(self) -> int:
        """Classification items (a generation counts as one)."""
        return len(self.planned) if self.planned is not None else 1

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def fail(self, exc: BaseException) -> None:
        self.reply(exc)
