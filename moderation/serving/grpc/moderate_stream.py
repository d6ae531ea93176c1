"""ModerateStream: an answer another LLM writes, checked as it arrives (see the proto).

Two tasks per call: this one waits for the model's verdicts and answers them; a reader takes
the caller's messages (each within the idle limit), tokenizes each delta where the planning
rule puts it (`serving.planning_threads`; `AnswerTokens`: only what the whole text's
tokenization decides) and feeds the tokens to the worker's check. Whatever ends the call
(flagged, complete, an error, the caller hanging up, which cancels this task) closes the
check, which frees its cache slot.
"""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from moderation.api import convert
from moderation.core.answer_text import AnswerTokens
from moderation.core.errors import InvalidArgument
from moderation.core.generation import MAX_STREAM_CHECK_TOKENS
from moderation.serving.front import Front
from moderation.serving.planning_threads import PlanningThreads
from moderation.serving.settings import ServeSettings
from moderation.serving.worker import (
    AnswerCheck,
    DeadlineExpiredError,
    QueueFullError,
    Worker,
)
from moderation.v1 import moderation_pb2 as pb


class StreamHost(Protocol):
    """What the servicer lends a ModerateStream call."""

    @property
    def settings(self) -> ServeSettings: ...

    open_checks: int

    def ready(self) -> tuple[Front, Worker]: ...

    @property
    def planning(self) -> PlanningThreads: ...

    def check_open(self, request: pb.ModerateStreamOpen) -> None: ...


async def moderate_stream(
    host: StreamHost,
    requests: AsyncIterator[pb.ModerateStreamRequest],
    deadline: float | None,
) -> AsyncGenerator[pb.ModerateStreamResponse, None]:
    settings = host.settings
    idle = settings.stream_idle_timeout
    first = await _next(requests, idle)
    if first is None:
        raise InvalidArgument("open", "the stream ended before its first message")
    if not first.HasField("open"):
        raise InvalidArgument("open", "the first message must open the check")
    front, worker = host.ready()
    host.check_open(first.open)
    every = first.open.check_tokens or settings.stream_check_tokens
    if not 1 <= every <= MAX_STREAM_CHECK_TOKENS:
        raise InvalidArgument(
            "open.check_tokens",
            f"must be between 1 and {MAX_STREAM_CHECK_TOKENS} (0 = the server's default "
            f"{settings.stream_check_tokens}), got {every}",
        )
    item = convert.answer_stream_item(first.open)
    try:
        planned, room = await host.planning.run(
            first.ByteSize(), front.planner.plan_answer_stream, item
        )
    except InvalidArgument as exc:
        raise exc.nested("open") from exc
    if host.open_checks >= settings.max_stream_checks:
        raise QueueFullError(
            f"{host.open_checks} stream checks are open, the limit "
            f"(MODERATION_MAX_STREAM_CHECKS); retry later"
        )
    host.open_checks += 1
    check: AnswerCheck | None = None
    reader: asyncio.Task[None] | None = None
    try:
        check = worker.check_answer(planned, every, deadline=deadline)
        # Off the loop: the first stream builds the tokenizer's cut rule (~0.1 s).
        answer = await host.planning.on_threads(AnswerTokens, front.planner.tokenizer)
        owed = _Owed(every)
        reader = asyncio.create_task(
            _read(host, first, requests, answer, check, room, owed), name="moderate-stream"
        )
        released = 0  # a flagging verdict releases nothing more
        while True:
            verdict = await check.verdict()
            owed.answered = verdict.checked_tokens
            if not verdict.result.flagged:
                released = answer.released(verdict.checked_tokens)
            yield pb.ModerateStreamResponse(
                released_chars=released,
                checked_tokens=verdict.checked_tokens,
                result=convert.classify_response(verdict.result),
                complete=verdict.complete,
            )
            if verdict.complete or verdict.result.flagged:
                return
    finally:
        host.open_checks -= 1
        if reader is not None:
            reader.cancel()  # it swallows its errors (into the check), so nothing to await
        if check is not None:
            check.close()


class _Utf8:
    """`delta_bytes` pieces decoded as they come: a character split between two pieces is
    completed by the second."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()

    def piece(self, data: bytes) -> str:
        try:
            return str(self._decoder.decode(data))
        except UnicodeDecodeError as exc:
            raise InvalidArgument("delta_bytes", f"not UTF-8: {exc.reason}") from None

    def whole(self) -> None:
        """A `delta` or `done` comes: no character may be left half sent."""
        if self._decoder.getstate()[0]:
            raise InvalidArgument("delta_bytes", "ends inside a character")


@dataclass
class _Owed:
    """Whether the caller may be waiting for a verdict (then its silence is not idleness)."""

    every: int
    fed: int = 0  # tokens fed to the check
    answered: int = 0  # tokens the last verdict covered

    def due(self) -> bool:
        return self.fed - self.answered >= self.every


async def _next(
    requests: AsyncIterator[pb.ModerateStreamRequest], idle: float, owed: _Owed | None = None
) -> pb.ModerateStreamRequest | None:
    """The caller's next message (None when its stream ended), within the idle limit: the
    caller may stay silent while a verdict it waits for is not sent yet."""
    pending = asyncio.ensure_future(anext(requests))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=idle)
            if done:
                return pending.result()
            if owed is None or not owed.due():
                raise DeadlineExpiredError(
                    f"no message from the caller for {idle:g} s (MODERATION_STREAM_IDLE_TIMEOUT)"
                )
    except StopAsyncIteration:
        return None
    finally:
        if not pending.done():
            pending.cancel()
        elif not pending.cancelled():
            # Cancelled (the caller hung up) just as its stream ended: the read's outcome is
            # moot, but unretrieved it would be logged as an error at garbage collection.
            pending.exception()


async def _read(
    host: StreamHost,
    message: pb.ModerateStreamRequest,
    requests: AsyncIterator[pb.ModerateStreamRequest],
    answer: AnswerTokens,
    check: AnswerCheck,
    room: int,
    owed: _Owed,
) -> None:
    """The caller's messages -> tokens fed to the check; an error ends the check with it."""
    settings = host.settings
    limit = settings.stream_max_answer_chars
    utf8 = _Utf8()
    try:
        first = True
        while True:
            if message.HasField("open") and not first:
                raise InvalidArgument("open", "only the first message may open the check")
            first = False
            text = message.delta
            if message.delta_bytes:
                text = utf8.piece(message.delta_bytes) + text
            elif message.delta or message.done:
                utf8.whole()
            if text:
                if answer.chars + len(text) > limit:
                    raise InvalidArgument(
                        "delta",
                        f"the answer exceeds {limit} characters "
                        "(MODERATION_STREAM_MAX_ANSWER_CHARS)",
                    )
                tokens = await host.planning.run(len(text), answer.push, text)
                _feed(check, tokens, answer, room)
            if message.done:
                utf8.whole()
                # A held tail at most: nothing new of the caller's to size.
                tokens = await host.planning.run(0, answer.finish)
                _feed(check, tokens, answer, room, end=True)
                return  # what the caller sends after `done` is not read
            owed.fed = answer.tokens
            following = await _next(requests, settings.stream_idle_timeout, owed)
            if following is None:
                raise InvalidArgument("done", "the stream ended before a message with done")
            message = following
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        check.fail(exc)


def _feed(
    check: AnswerCheck, tokens: Sequence[int], answer: AnswerTokens, room: int, *, end: bool = False
) -> None:
    if answer.tokens > room:
        raise InvalidArgument(
            "delta",
            f"the answer's {answer.tokens} tokens exceed the {room} a classification prompt "
            "holds beside its context",
        )
    if end and answer.tokens == 0:
        raise InvalidArgument("delta", "the answer is empty: nothing to classify")
    if tokens or end:
        check.feed(tokens, end=end)
