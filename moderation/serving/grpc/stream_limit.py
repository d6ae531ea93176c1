"""Calls per connection, and the moments a connection reaches `--max-concurrent-streams`.

gRPC's C core enforces the limit before any Python code runs: a client that honours the
server's SETTINGS frame (every gRPC client) holds its extra calls until a stream frees, and one
that does not gets RST_STREAM REFUSED_STREAM. The C core records that refusal nowhere grpcio
exposes (no channelz count: the stream never starts; no stat reachable from Python), so this
module watches what Python does see: every call the server runs, counted per connection
(`context.peer()`: the connection's remote address and port). A connection whose count reaches
the limit is full: the next call on it waits in its client or is refused. Each time one
fills, `moderation_grpc_connection_stream_limit_reached_total` goes up and a warning is logged
(at most one line per `WARN_EVERY_S`, naming the peer and how often it happened since the last
line; never a request's content).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import structlog

log = structlog.get_logger("moderation.serving.grpc.stream_limit")

WARN_EVERY_S = 60.0
"""At most one warning per this many seconds: a client that keeps its connection full would
otherwise write a line per call."""

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]

# A handler's behaviour by its kind, and how a handler of that kind is built around another.
_REBUILD: dict[str, Callable[..., grpc.RpcMethodHandler]] = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


class ConnectionStreams:
    """In-flight calls per connection (its peer string). Touched only on the event loop."""

    def __init__(self, limit: int):
        self.limit = limit
        self._calls: dict[str, int] = {}

    def open(self, peer: str) -> bool:
        """Count a call on `peer`'s connection; True when it makes the connection full."""
        calls = self._calls.get(peer, 0) + 1
        self._calls[peer] = calls
        # Equality, not >=: the C core never lets a connection's count past the limit, and a
        # connection that stays full is counted again only after it had room.
        return calls == self.limit

    def close(self, peer: str) -> None:
        calls = self._calls[peer] - 1
        if calls:
            self._calls[peer] = calls
        else:
            del self._calls[peer]  # one entry per open connection with calls, no more

    def calls(self, peer: str | None = None) -> int:
        """Calls in flight on `peer`'s connection, or on all of them."""
        return sum(self._calls.values()) if peer is None else self._calls.get(peer, 0)

    def __len__(self) -> int:
        """Connections with a call in flight."""
        return len(self._calls)


class LimitWarning:
    """The rate-limited warning that a connection is full."""

    def __init__(self, every_s: float = WARN_EVERY_S, clock: Callable[[], float] = time.monotonic):
        self.every_s = every_s
        self.clock = clock
        self._last: float | None = None
        self._unlogged = 0

    def reached(self, peer: str, limit: int) -> None:
        self._unlogged += 1
        now = self.clock()
        if self._last is not None and now - self._last < self.every_s:
            return
        log.warning(
            "connection reached its concurrent stream limit; its next calls wait in the client "
            "or are refused (REFUSED_STREAM)",
            peer=peer,
            limit=limit,
            setting="--max-concurrent-streams",
            times=self._unlogged,  # since the last line (the first time: 1)
        )
        self._last, self._unlogged = now, 0


class StreamLimitWatch(grpc.aio.ServerInterceptor):
    """Counts every call of the server (health and reflection too: they hold streams as well)
    per connection; when one fills, `on_full` (the metric) and the rate-limited warning."""

    def __init__(
        self, limit: int, on_full: Callable[[], None], warning: LimitWarning | None = None
    ):
        self.streams = ConnectionStreams(limit)
        self.on_full = on_full
        self.warning = warning or LimitWarning()

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        for kind, rebuild in _REBUILD.items():
            behaviour = getattr(handler, kind)
            if behaviour:
                return rebuild(
                    self._counted(behaviour),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler

    def _open(self, context: grpc.aio.ServicerContext) -> str:
        peer = context.peer()
        if self.streams.open(peer):
            self.on_full()
            self.warning.reached(peer, self.streams.limit)
        return peer

    def _counted(self, behaviour: Any) -> Any:
        """`behaviour` (a coroutine function, or an async generator function for streamed
        answers) counted on its connection while it runs."""
        streams = self.streams
        if inspect.isasyncgenfunction(behaviour):

            async def answers(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                peer = self._open(context)
                responses = behaviour(request, context)
                try:
                    async for response in responses:
                        yield response
                finally:
                    streams.close(peer)
                    # Closed here, not later by the garbage collector: the handlers inside (the
                    # request log line, the in-flight count drain waits on) end with the call.
                    await responses.aclose()

            return answers
        if inspect.iscoroutinefunction(behaviour):

            async def answer(request: Any, context: grpc.aio.ServicerContext) -> Any:
                peer = self._open(context)
                try:
                    return await behaviour(request, context)
                finally:
                    streams.close(peer)

            return answer
        return behaviour  # a synchronous handler runs on gRPC's thread pool: none here
