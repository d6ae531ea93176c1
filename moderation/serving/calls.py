"""The record of one ModerationService call, whichever transport it came by (gRPC or HTTP).

The transport's edge (the gRPC interceptor, the HTTP listener) opens a record per call and
writes its one log line from it; the servicer adds what it knows (token counts, category, the
error) through `current_call()`. Kept apart from both edges so that neither imports the other.
"""

from __future__ import annotations

import contextvars
import hmac
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc

REQUEST_ID_KEY = "x-request-id"
REQUEST_ID_CHARS = 128
"""The longest request id kept from a caller (the log and the echo quote only a prefix)."""


def new_request_id(sent: str | None) -> str:
    """The call's request id: the caller's (a prefix of it: it is echoed and logged), or a new
    one."""
    return (sent or uuid.uuid4().hex)[:REQUEST_ID_CHARS]


class BearerToken:
    """The check of an `authorization: Bearer <token>` value, on either transport."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def accepts(self, sent: str | None) -> bool:
        # Constant time: no timing oracle on the token. The whole value must match (a suffix
        # after the token is refused). aiohttp hands undecodable header bytes over as
        # surrogates: encoded back as the bytes sent, they are a mismatch, never an error.
        return hmac.compare_digest((sent or "").encode(errors="surrogateescape"), self._expected)


MAX_ERROR_CHARS = 512
"""The longest status message sent or logged, on either transport: errors quote only prefixes
of caller values (`moderation.core.errors.quote`), this is the last line of defence (a message
past ~8 kB would also fail in gRPC's metadata)."""


def capped(message: str) -> str:
    """A status message as it is sent and logged: at most MAX_ERROR_CHARS characters."""
    if len(message) > MAX_ERROR_CHARS:
        return message[:MAX_ERROR_CHARS] + "..."
    return message


OVERLOAD = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})
SERVER_FAULTS = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})


@dataclass
class CallRecord:
    """The facts of one RPC for its log line; the servicer adds fields (tokens, category)."""

    method: str
    request_id: str
    grpc_type: str = "unary"  # or "server_stream", as go-grpc-prometheus labels them
    start: float = field(default_factory=time.perf_counter)
    fields: dict[str, Any] = field(default_factory=dict)
    span: Any = None  # the call's OpenTelemetry span, with --tracing (serving.tracing)


_current: contextvars.ContextVar[CallRecord | None] = contextvars.ContextVar(
    "moderation_call", default=None
)


def current_call() -> CallRecord:
    """The record of the RPC being handled (a throwaway one outside an intercepted call)."""
    return _current.get() or CallRecord(method="", request_id="")


def bind_call(record: CallRecord) -> None:
    """Make `record` the current call of this task (each call runs in a task of its own, so the
    binding stays with the call)."""
    _current.set(record)


def log_level(code: grpc.StatusCode) -> int:
    """Shed load (RESOURCE_EXHAUSTED) and refusals while loading or draining (UNAVAILABLE) are
    what an operator alerts on: warnings, not lines among the info ones; faults are errors."""
    if code in SERVER_FAULTS:
        return logging.ERROR
    if code in OVERLOAD:
        return logging.WARNING
    return logging.INFO
