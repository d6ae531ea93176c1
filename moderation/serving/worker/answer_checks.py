"""ModerateStream checks on the scheduler's tick: answers another LLM writes, checked as they
arrive, in the same engine passes as classification and generation.

A check job holds one engine check stream (`Classifier.open_stream`: one generation cache slot
holding the output prompt and a rolling window of the answer) from the tick that admits it
until it ends: flagged, complete, cancelled (the caller hung up or idled past the server's
limit) or past its deadline. Each tick takes, from every open check with enough new tokens,
the next `every` of them (or the rest once the caller said the answer is complete); the
scheduler runs them in its engine step (`GuardedGenerator.step_with`), so the weights are read
once for the decoders and every check. The caller feeds tokens from its own thread (`feed`,
under the scheduler's lock); everything else runs on the ticking thread.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from moderation.core.classifier import Classifier, OutputStream, PlannedItem
from moderation.core.decision import Classification
from moderation.core.errors import InvalidArgument
from moderation.serving.worker import CheckVerdict, DeadlineExpiredError

Due = list[tuple["CheckJob", list[int]]]


@dataclass(eq=False)  # identity equality, as every job
class CheckJob:
    """A ModerateStream check; `reply` gets its verdicts, then maybe an exception (the worker
    thread's hands them to the caller's event loop, the model process's to the pipe)."""

    reply: Callable[[CheckVerdict | BaseException], None] | None = None
    deadline: float | None = None
    cancelled: bool = False
    queued_at: float = field(default_factory=time.monotonic)  # for the queue wait metric
    started_at: float | None = None  # the tick that took it
    planned: PlannedItem | None = None
    every: int = 16
    tokens: list[int] = field(default_factory=list)  # received so far (under the lock)
    ended: bool = False  # the caller said the answer is complete (under the lock)
    checked: int = 0  # tokens the verdicts sent cover
    stream: OutputStream | None = None  # the engine check stream, once admitted
    last: Classification | None = None
    over: bool = False  # the last verdict (or error) was sent

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def emit(self, event: CheckVerdict | BaseException) -> None:
        assert self.reply is not None
        self.reply(event)

    def fail(self, exc: BaseException) -> None:
        self.over = True
        self.emit(exc)


class AnswerChecks:
    """The scheduler's open ModerateStream checks."""

    def __init__(self, classifier: Classifier, lock: threading.Condition):
        self.classifier = classifier
        self.engine = classifier.engine
        self.lock = lock
        self.incoming: list[CheckJob] = []  # opened by callers, not yet taken (under the lock)
        self.open: list[CheckJob] = []
        self.waiting: list[CheckJob] = []  # admitted, waiting for a free slot

    def __len__(self) -> int:
        return len(self.open) + len(self.waiting)

    def feed(self, job: CheckJob, tokens: Sequence[int], end: bool) -> None:
        """Any thread, with the lock held."""
        if not job.ended:
            job.tokens.extend(tokens)
            job.ended = end

    def take_incoming(self) -> list[CheckJob]:
        """The checks opened since the last tick (with the lock held)."""
        taken, self.incoming = self.incoming, []
        return taken

    def busy(self) -> bool:
        """Whether a tick has something to do for the checks (with the lock held)."""
        if self.incoming:
            return True
        for job in self.open:
            if job.cancelled or self._next(job) is not None:
                return True
        return bool(self.waiting) and (any(j.cancelled for j in self.waiting) or self._room())

    def _room(self) -> bool:
        # A generation already admitted into the engine counts on the slot it waits for.
        return self.engine.free_slots - self.engine.num_waiting >= 1

    def admit(self, jobs: Sequence[CheckJob]) -> None:
        """Open the engine streams of new checks (and of those waiting for a slot)."""
        waiting, self.waiting = self.waiting, []
        now = time.monotonic()
        for job in [*waiting, *jobs]:
            if job.cancelled:
                continue
            if job.expired(now):
                job.fail(DeadlineExpiredError("the deadline passed while the request waited"))
                continue
            job.started_at = job.started_at or now
            if not self._room():
                self.waiting.append(job)
                continue
            assert job.planned is not None
            try:
                job.stream = self.classifier.open_stream(job.planned)
            except InvalidArgument as exc:
                job.fail(exc)
                continue
            if job.stream is None:
                self.waiting.append(job)
            else:
                self.open.append(job)

    def drop_stopped(self, now: float) -> None:
        """Checks nobody waits for (or past their deadline) free their slot now."""
        for job in [*self.open, *self.waiting]:
            if job.cancelled or job.over or job.expired(now):
                if not (job.cancelled or job.over):
                    job.fail(DeadlineExpiredError("the deadline passed during the check"))
                self._close(job)

    def due(self) -> Due:
        """The next tokens of every open check that has enough of them, and the complete
        answers whose last verdict covered them all already (answered at once)."""
        due: Due = []
        with self.lock:
            for job in self.open:
                tokens = self._next(job)
                if tokens is None:
                    continue
                if tokens:
                    due.append((job, tokens))
                else:  # complete, nothing left to check: the last verdict was on all of it
                    self._answer(job, job.last)
        return due

    @staticmethod
    def streams(due: Due) -> list[tuple[OutputStream, list[int]]]:
        """The engine check streams of `due`'s checks (all open), with their tokens."""
        pairs = []
        for job, tokens in due:
            assert job.stream is not None
            pairs.append((job.stream, tokens))
        return pairs

    def _next(self, job: CheckJob) -> list[int] | None:
        if job.over or job.cancelled:
            return None
        left = len(job.tokens) - job.checked
        if left >= job.every or (job.ended and left > 0):
            return job.tokens[job.checked : job.checked + job.every]
        return [] if job.ended else None

    def checked(self, due: Due, results: Sequence[Classification]) -> None:
        """The verdicts of `due`'s checks, in order: sent; the flagged and complete end."""
        for (job, tokens), result in zip(due, results, strict=True):
            job.checked += len(tokens)
            assert job.planned is not None
            job.last = dataclasses.replace(
                result,
                context_tokens=job.planned.context_tokens,
                context_messages_dropped=job.planned.context_messages_dropped,
            )
            with self.lock:
                complete = job.ended and job.checked == len(job.tokens)
            if complete or result.flagged:
                self._answer(job, job.last)
            else:
                job.emit(CheckVerdict(job.checked, job.last, complete=False))

    def _answer(self, job: CheckJob, result: Classification | None) -> None:
        """The last verdict: flagged, or on the whole answer."""
        if result is None:  # the front refuses an empty answer; never reached
            job.fail(InvalidArgument("delta", "the answer is empty: nothing to classify"))
        else:
            job.over = True
            job.emit(CheckVerdict(job.checked, result, complete=not result.flagged))
        self._close(job)

    def fail(self, jobs: Sequence[CheckJob], exc: BaseException) -> None:
        for job in jobs:
            job.fail(exc)
            self._close(job)

    def _close(self, job: CheckJob) -> None:
        if job.stream is not None:
            self.classifier.close_output_stream(job.stream)
            job.stream = None
        for jobs in (self.open, self.waiting):
            if job in jobs:
                jobs.remove(job)
