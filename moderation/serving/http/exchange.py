"""One HTTP request's facts for its log line and metrics, beside its call record: set by the
listener's middleware for the request's task, read and completed by the routes."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

import grpc

from moderation.serving.calls import CallRecord
from moderation.serving.http.status import CallError


@dataclass
class Exchange:
    """One HTTP request's facts for its log line and metrics, beside its call record."""

    record: CallRecord
    code: grpc.StatusCode = grpc.StatusCode.OK  # the gRPC status it ended with
    rpc: str = ""  # the ModerationService method that answered it


_exchange: contextvars.ContextVar[Exchange] = contextvars.ContextVar("http_exchange")


def begin(record: CallRecord) -> Exchange:
    """The exchange of the request this task handles (each request is a task of its own)."""
    exchange = Exchange(record)
    _exchange.set(exchange)
    return exchange


def current() -> Exchange:
    return _exchange.get()


def request_id() -> str:
    return _exchange.get().record.request_id


def note_error(exc: CallError) -> None:
    """The request ended with this error: its log line and metrics say so."""
    exchange = _exchange.get()
    exchange.code = exc.code
    exchange.record.fields.setdefault("error", exc.message)
