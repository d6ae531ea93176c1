"""One HTTP request's facts for its log line and metrics, beside its call record, and its one
deadline: set by the listener's middleware for the request's task, read and completed by the
routes.

The deadline is the request's `grpc-timeout` counted from its arrival, for the whole request:
reading and parsing its body and every call the route makes on its behalf (chat completions
may classify the input, generate, then classify the answer; `/v1/models/{id}` asks for the
model's info). Each call gets what is left of it (`within`), not a timeout of its own, and no
call starts once it has passed: DEADLINE_EXCEEDED, a 504 (a streamed answer already under way
ends with it as its last event instead, as a gRPC stream ends with its status). Without the
header a request has no deadline, as a gRPC call without one.
"""

from __future__ import annotations

import asyncio
import contextvars
import re
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from moderation.serving.calls import CallRecord
from moderation.serving.http.status import CallError

TIMEOUT_HEADER = "grpc-timeout"
_TIMEOUT = re.compile(r"(\d{1,8})([HMSmun])")
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def parse_timeout(value: str) -> float:
    """A `grpc-timeout` header ("5S", "250m"), as grpc-gateway reads it, in seconds."""
    match = _TIMEOUT.fullmatch(value.strip())
    if match is None:
        raise CallError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{TIMEOUT_HEADER} header: expected digits and a unit (H, M, S, m, u, n), e.g. 5S",
            TIMEOUT_HEADER,
        )
    return int(match.group(1)) * _TIMEOUT_UNITS[match.group(2)]


def deadline_exceeded() -> CallError:
    return CallError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")


@dataclass
class Exchange:
    """One HTTP request's facts for its log line and metrics, beside its call record."""

    record: CallRecord
    timeout: str | None = None  # the request's grpc-timeout header, as sent
    arrived: float = field(default_factory=time.monotonic)
    code: grpc.StatusCode = grpc.StatusCode.OK  # the gRPC status it ended with
    rpc: str = ""  # the ModerationService method that answered it

    def deadline(self) -> float | None:
        """The time.monotonic() by which the whole request is answered, None without one; a
        malformed header is the caller's error (400), raised to the route that asks first."""
        return None if self.timeout is None else self.arrived + parse_timeout(self.timeout)


_exchange: contextvars.ContextVar[Exchange] = contextvars.ContextVar("http_exchange")


def begin(record: CallRecord, timeout: str | None = None) -> Exchange:
    """The exchange of the request this task handles (each request is a task of its own), with
    its `grpc-timeout` header (parsed when a route asks for the deadline: /health never does)."""
    exchange = Exchange(record, timeout)
    _exchange.set(exchange)
    return exchange


def current() -> Exchange:
    return _exchange.get()


def request_id() -> str:
    return _exchange.get().record.request_id


def deadline() -> float | None:
    """The deadline of the request this task handles (see the module doc)."""
    return _exchange.get().deadline()


class within:  # named as asyncio.timeout, the context manager it wraps
    """`async with within() as deadline:` the block, cut off at the request's deadline
    (DEADLINE_EXCEEDED); not entered at all once it has passed. The deadline it yields is for
    the servicer's context. A class, not a generator: CallError is frozen, and
    asynccontextmanager sets the traceback of what passes through it."""

    def __init__(self) -> None:
        self._timeout: asyncio.Timeout | None = None

    async def __aenter__(self) -> float | None:
        at = deadline()
        if at is None:
            return None
        left = at - time.monotonic()
        if left <= 0:
            raise deadline_exceeded()
        self._timeout = asyncio.timeout(left)
        await self._timeout.__aenter__()
        return at

    async def __aexit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if self._timeout is None:
            return
        try:
            await self._timeout.__aexit__(kind, exc, tb)
        except TimeoutError:
            raise deadline_exceeded() from None


def note_error(exc: CallError) -> None:
    """The request ended with this error: its log line and metrics say so."""
    exchange = _exchange.get()
    exchange.code = exc.code
    exchange.record.fields.setdefault("error", exc.message)
