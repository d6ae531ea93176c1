"""A connection that reaches --max-concurrent-streams is counted and logged (issue #19).

gRPC's C core holds or refuses the streams past the limit before Python sees them; the server
counts the calls each connection carries and reports when one fills (serving/grpc/stream_limit).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from moderation.serving.grpc.stream_limit import (
    ConnectionStreams,
    LimitWarning,
    StreamLimitWatch,
)
from moderation.v1 import moderation_pb2_grpc as pb_grpc
from tests.servers import InProcessServer, captured_logs, demo_server

LIMIT = 3
REACHED = "moderation_grpc_connection_stream_limit_reached_total"


@pytest.fixture(scope="module")
def served(demo_checkpoint: Path) -> Iterator[InProcessServer]:
    with demo_server(demo_checkpoint, max_concurrent_streams=LIMIT) as server:
        yield server


def reached(server: InProcessServer) -> float:
    registry = server.server.metrics.registry
    return registry.get_sample_value(REACHED) or 0.0


def calls_in_flight(server: InProcessServer) -> int:
    """Calls the server counts on all its connections."""
    return server.server.stream_watch.streams.calls()


def connection(server: InProcessServer) -> grpc.Channel:
    """A channel with a connection of its own (channels of one process otherwise share one)."""
    return grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])


def wait_for(condition: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


class OpenStreams:
    """`n` ModerateStream calls on one channel, held open (no message sent) until closed."""

    def __init__(self, channel: grpc.Channel, n: int):
        self._release = threading.Event()
        stub = pb_grpc.ModerationServiceStub(channel)
        self.calls = [stub.ModerateStream(self._silence(), timeout=60) for _ in range(n)]

    def _silence(self) -> Iterator[Any]:
        self._release.wait(60)  # a caller that has not said anything yet
        return
        yield

    def close(self) -> None:
        self._release.set()
        for call in self.calls:
            call.cancel()


def test_calls_within_the_limit_leave_the_counter_alone(served: InProcessServer) -> None:
    before = reached(served)
    # LIMIT - 1 on each of two connections: more than LIMIT on the server, none on one.
    with connection(served) as a, connection(served) as b:
        streams = [OpenStreams(a, LIMIT - 1), OpenStreams(b, LIMIT - 1)]
        try:
            wait_for(lambda: calls_in_flight(served) == 2 * (LIMIT - 1))
            assert reached(served) == before
        finally:
            for s in streams:
                s.close()
    wait_for(lambda: calls_in_flight(served) == 0)
    assert reached(served) == before


def test_a_full_connection_is_counted_and_logged_with_its_peer(served: InProcessServer) -> None:
    before = reached(served)
    with captured_logs() as logs, connection(served) as ch:
        streams = OpenStreams(ch, LIMIT + 2)  # the client holds the two past the limit
        try:
            wait_for(lambda: reached(served) > before)
            wait_for(lambda: calls_in_flight(served) == LIMIT)
            time.sleep(0.2)  # nothing more starts while the connection stays full
            assert calls_in_flight(served) == LIMIT
            assert reached(served) == before + 1
        finally:
            streams.close()
        wait_for(lambda: calls_in_flight(served) == 0)
    warnings = [e for e in logs if e["event"].startswith("connection reached its concurrent")]
    assert len(warnings) == 1, logs
    line = warnings[0]
    assert line["log_level"] == "warning"
    assert line["peer"].startswith("ipv4:127.0.0.1:") and line["limit"] == LIMIT
    # The connection and the setting, nothing of any call.
    assert set(line) == {"event", "log_level", "peer", "limit", "setting", "times"}


def test_the_counter_is_exported_before_it_first_counts(served: InProcessServer) -> None:
    from prometheus_client import generate_latest

    body = generate_latest(served.server.metrics.registry).decode()
    assert f"\n{REACHED} " in body


def test_a_connection_counts_again_only_after_it_had_room() -> None:
    streams = ConnectionStreams(limit=2)
    assert [streams.open("a"), streams.open("b"), streams.open("a")] == [False, False, True]
    streams.close("a")
    assert streams.open("a") is True  # full again: counted again
    for _ in range(2):
        streams.close("a")
    streams.close("b")
    assert len(streams) == 0  # a connection without calls leaves no entry


def test_the_warning_is_rate_limited_and_says_how_often() -> None:
    now = [100.0]
    warning = LimitWarning(every_s=60.0, clock=lambda: now[0])
    with captured_logs() as logs:
        warning.reached("ipv4:10.0.0.1:1", 3)
        now[0] += 30
        warning.reached("ipv4:10.0.0.2:2", 3)
        warning.reached("ipv4:10.0.0.3:3", 3)
        now[0] += 31
        warning.reached("ipv4:10.0.0.4:4", 3)
    assert [(e["peer"], e["times"]) for e in logs] == [
        ("ipv4:10.0.0.1:1", 1),
        ("ipv4:10.0.0.4:4", 3),
    ]


class _Peer:
    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


def test_every_kind_of_call_is_counted_while_it_runs() -> None:
    """Unary or streamed, each way: the call counts on its connection while it runs, and the
    handler keeps its (de)serializers."""
    watch = StreamLimitWatch(LIMIT, lambda: None)
    seen: list[int] = []

    async def unary(request: Any, context: Any) -> str:
        seen.append(watch.streams.calls("ipv4:127.0.0.1:1"))
        return "answer"

    async def streamed(request: Any, context: Any) -> Any:
        seen.append(watch.streams.calls("ipv4:127.0.0.1:1"))
        yield "answer"

    handlers = {
        "unary_unary": grpc.unary_unary_rpc_method_handler(unary, str, str),
        "unary_stream": grpc.unary_stream_rpc_method_handler(streamed, str, str),
        "stream_unary": grpc.stream_unary_rpc_method_handler(unary, str, str),
        "stream_stream": grpc.stream_stream_rpc_method_handler(streamed, str, str),
    }

    async def call(kind: str) -> None:
        async def continuation(details: Any) -> Any:
            return handlers[kind]

        wrapped = await watch.intercept_service(continuation, None)  # type: ignore[arg-type]
        assert (wrapped.request_deserializer, wrapped.response_serializer) == (str, str)
        behaviour = getattr(wrapped, kind)
        if kind.endswith("stream"):
            assert [a async for a in behaviour("request", _Peer())] == ["answer"]
        else:
            assert await behaviour("request", _Peer()) == "answer"

    for kind in handlers:
        asyncio.run(call(kind))
    assert seen == [1, 1, 1, 1]
    assert watch.streams.calls() == 0  # each closed after its call
