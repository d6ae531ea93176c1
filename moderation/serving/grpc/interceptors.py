"""Server interceptors: bearer-token auth, and one log line plus metrics per request.

Each ModerationService call has a request id: the caller's `x-request-id` metadata, or a new
one. It is in the call's log line and comes back in the trailing metadata as `x-request-id`.

Health and reflection are exempt from auth (probes and tooling carry no token) and are neither
logged nor counted (probes every few seconds would drown the request log).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from moderation.core.errors import InvalidArgument
from moderation.serving import tracing
from moderation.serving.calls import (
    OVERLOAD,
    REQUEST_ID_KEY,
    SERVER_FAULTS,
    BearerToken,
    CallRecord,
    bind_call,
    current_call,
    log_level,
    new_request_id,
)
from moderation.serving.metrics import Metrics

# The call record moved to moderation.serving.calls (the HTTP listener shares it); its names stay
# importable from here, where the servicer and the tests import them.
__all__ = [
    "OVERLOAD",
    "REQUEST_ID_KEY",
    "SERVER_FAULTS",
    "BearerTokenAuth",
    "CallRecord",
    "RequestTelemetry",
    "current_call",
]

SERVICE = "moderation.v1.ModerationService"
SERVICE_PREFIX = f"/{SERVICE}/"
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
DEADLINE_SLACK_S = 0.25
"""A call cancelled this close to its deadline ended by it: logged as DEADLINE_EXCEEDED."""

log = structlog.get_logger("moderation.requests")

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


def _metadata(details: grpc.HandlerCallDetails, key: str) -> str | None:
    for k, v in details.invocation_metadata or ():
        if k == key:
            return v if isinstance(v, str) else v.decode(errors="replace")
    return None


class BearerTokenAuth(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED unless `authorization: Bearer <token>`; health and reflection are open."""

    def __init__(self, token: str):
        self._token = BearerToken(token)

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if details.method.startswith(OPEN_PREFIXES):
            return handler
        if self._token.accepts(_metadata(details, "authorization")):
            return handler
        message = "missing or invalid bearer token (metadata `authorization: Bearer <token>`)"

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        async def deny_stream(
            request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # unreachable; makes this an async generator like the handler it replaces

        if handler is not None and handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(deny_stream)  # type: ignore[arg-type]
        if handler is not None and handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny_stream)  # type: ignore[arg-type]
        return grpc.unary_unary_rpc_method_handler(deny)


@dataclass(frozen=True)
class Undecodable:
    """A request body that is not the method's message (invalid UTF-8 in a string, garbage
    bytes): it reaches the handler as this, and gets INVALID_ARGUMENT there, logged and counted,
    instead of gRPC's bare UNKNOWN."""

    size: int
    error: str


DEFER_BYTES = 64 * 1024
"""Bodies larger than this are parsed by the servicer on a planning thread, after their counts
are checked on the wire (`moderation.serving.grpc.wire`), not here on the event loop."""


@dataclass(frozen=True)
class Deferred:
    """A large request body, not parsed yet: `message_type.FromString(data)` once checked."""

    data: bytes
    message_type: Any

    def parse(self) -> Any:
        return self.message_type.FromString(self.data)


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserializer` that returns `Undecodable` instead of raising, and `Deferred` for a large
    body of a generated message type."""
    if deserializer is None:
        return None
    message_type = getattr(deserializer, "__self__", None)  # Message.FromString, bound
    deferrable = message_type is not None and hasattr(message_type, "DESCRIPTOR")

    def deserialize(data: bytes) -> Any:
        if deferrable and len(data) > DEFER_BYTES:
            return Deferred(data, message_type)
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError, and whatever else a parser raises
            return Undecodable(len(data), type(exc).__name__)

    return deserialize


UNDECODABLE_MESSAGE = "the request body is not a valid message of this method"


class RequestTelemetry(grpc.aio.ServerInterceptor):
    """Per ModerationService call: request id, one JSON log line, request metrics, and the
    in-flight count that drain waits on."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.in_flight = 0  # touched only on the event loop

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(SERVICE_PREFIX):
            return handler
        method = details.method.removeprefix(SERVICE_PREFIX)
        # The caller's id is echoed in the log and the trailers: a short prefix of it only.
        request_id = new_request_id(_metadata(details, REQUEST_ID_KEY))
        if handler.unary_unary:
            unary = handler.unary_unary

            async def unary_call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                record = self._begin(method, request_id, context, "unary")
                code = grpc.StatusCode.OK
                try:
                    if isinstance(request, Undecodable):
                        await self._refuse(record, request, context)
                    response = await unary(request, context)
                    self.metrics.msg_sent.labels("unary", SERVICE, method).inc()
                    return response
                except BaseException as exc:
                    code = _code_of(exc, context)
                    raise
                finally:
                    self._end(record, code)

            return grpc.unary_unary_rpc_method_handler(
                unary_call,
                request_deserializer=tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            stream = handler.unary_stream

            async def stream_call(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                record = self._begin(method, request_id, context, "server_stream")
                code = grpc.StatusCode.OK
                sent = self.metrics.msg_sent.labels("server_stream", SERVICE, method)
                last_delta: float | None = None
                try:
                    if isinstance(request, Undecodable):
                        await self._refuse(record, request, context)
                    if inspect.isasyncgenfunction(stream):
                        async for response in stream(request, context):
                            if _is_delta(response):
                                # Time to first token, then between tokens: what a user of a
                                # stream waits for (deltas are sent as tokens are decoded).
                                now = time.perf_counter()
                                if last_delta is None:
                                    self.metrics.time_to_first_token.observe(now - record.start)
                                else:
                                    self.metrics.inter_token_latency.observe(now - last_delta)
                                last_delta = now
                            sent.inc()  # handed to gRPC, as go-grpc-prometheus counts it
                            yield response
                    else:  # a coroutine that writes with context.write
                        await stream(request, context)
                except BaseException as exc:
                    code = _code_of(exc, context)
                    raise
                finally:
                    self._end(record, code)

            return grpc.unary_stream_rpc_method_handler(
                stream_call,
                request_deserializer=tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream:
            return self._bidi(handler, method, request_id)
        return handler  # the service has no client-streaming-only methods

    def _bidi(
        self, handler: grpc.RpcMethodHandler, method: str, request_id: str
    ) -> grpc.RpcMethodHandler:
        """A stream in both directions (ModerateStream): the same record, log line and
        metrics; each message counted; an undecodable one is INVALID_ARGUMENT naming
        `message`."""
        bidi = handler.stream_stream
        metrics = self.metrics

        async def bidi_call(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            record = self._begin(method, request_id, context, "bidi_stream")
            received = metrics.msg_received.labels("bidi_stream", SERVICE, method)
            sent = metrics.msg_sent.labels("bidi_stream", SERVICE, method)

            async def checked() -> AsyncIterator[Any]:
                first = True
                async for request in requests:
                    if not first:  # record_start counted the first
                        received.inc()
                    first = False
                    if isinstance(request, Undecodable):
                        metrics.undecodable.inc()
                        detail = f"{UNDECODABLE_MESSAGE} ({request.error}, {request.size} bytes)"
                        raise InvalidArgument("message", detail)
                    yield request

            code = grpc.StatusCode.OK
            try:
                async for response in bidi(checked(), context):
                    sent.inc()
                    yield response
            except BaseException as exc:
                code = _code_of(exc, context)
                raise
            finally:
                self._end(record, code)

        return grpc.stream_stream_rpc_method_handler(
            bidi_call,  # type: ignore[arg-type]
            request_deserializer=tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    async def _refuse(
        self, record: CallRecord, request: Undecodable, context: grpc.aio.ServicerContext
    ) -> None:
        record.fields["error"] = f"{UNDECODABLE_MESSAGE} ({request.error}, {request.size} bytes)"
        self.metrics.undecodable.inc()
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, UNDECODABLE_MESSAGE)

    def _begin(
        self, method: str, request_id: str, context: grpc.aio.ServicerContext, grpc_type: str
    ) -> CallRecord:
        # The id goes back to the caller (trailing metadata, errors included) so that a caller
        # that did not send one can still quote it when asking about a request in the logs.
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        record = CallRecord(method, request_id, grpc_type)
        self.metrics.record_start(grpc_type, SERVICE, method)
        bind_call(record)  # the call runs in its own task, so this stays with the call
        tracing.begin(record, f"{SERVICE}/{method}")
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        return record

    def _end(self, record: CallRecord, code: grpc.StatusCode) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)
        latency = time.perf_counter() - record.start
        self.metrics.record_end(record.grpc_type, SERVICE, record.method, code.name, latency)
        tracing.end(record, code.name)
        log.log(
            log_level(code),
            "request",
            request_id=record.request_id,
            method=record.method,
            code=code.name,
            latency_ms=round(latency * 1000, 2),
            **record.fields,
        )


def _is_delta(response: Any) -> bool:
    which = getattr(response, "WhichOneof", None)
    return which is not None and which("event") == "delta"


def _code_of(exc: BaseException, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The status an exception ends the call with."""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        remaining = context.time_remaining()
        # The client's deadline ends the call first: it cancels the stream a moment before this
        # side's copy of the deadline (started when the request arrived) runs out.
        if remaining is not None and remaining <= DEADLINE_SLACK_S:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    code = context.code()  # set by context.abort
    if isinstance(code, grpc.StatusCode):
        return code
    return grpc.StatusCode.UNKNOWN  # what gRPC answers for an unhandled exception
