"""One deadline per HTTP request (issue #19: the `grpc-timeout` deadline covers the request):
every call a route makes on the request's behalf gets what is left of it, none starts once it
has passed (504), and a stream under way ends at it, as a gRPC GenerateStream does.

The slow parts are the servicer's own methods behind a delay (a double of a busy model): each
part fits in the timeout, their sum does not. Wall-time bounds are correctness bounds (the
answer comes at the deadline, not after the sum of the parts) with generous margins, not speed
assertions.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from moderation.serving.calls import CallRecord
from moderation.serving.http import exchange as http_exchange
from moderation.serving.http.status import CallError
from moderation.v1 import moderation_pb2 as pb
from tests.servers import InProcessServer, demo_server, free_port

MODEL = "guarded-mistral"
MARGIN = 1.5  # seconds past the deadline a loaded machine may take to answer
CHAT: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Tell me a story"}],
    "max_tokens": 4,
    "moderation": {"model": "openai"},  # scores the input, generates, scores the answer
}


# ---------------------------------------------------------------- the exchange itself


def in_exchange(timeout: str | None, arrived_ago: float, body: Any) -> Any:
    """body() in the task of a request that arrived `arrived_ago` seconds ago."""

    async def main() -> Any:
        exchange = http_exchange.begin(CallRecord(method="", request_id="r"), timeout)
        exchange.arrived -= arrived_ago
        return await body()

    return asyncio.run(main())


def test_a_call_gets_what_is_left_of_the_deadline_not_the_whole_timeout() -> None:
    async def call() -> tuple[float, float]:
        start = time.monotonic()
        with pytest.raises(CallError) as info:
            async with http_exchange.within() as deadline:
                await asyncio.sleep(10)
        assert (info.value.status, info.value.code) == (504, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert deadline is not None
        return deadline - http_exchange.current().arrived, time.monotonic() - start

    # 3 s from the request's arrival, 2 s ago: 1 s left, not 3
    timeout, took = in_exchange("3S", 2.0, call)
    assert timeout == pytest.approx(3.0) and took < 2.0


def test_no_call_starts_once_the_deadline_has_passed() -> None:
    started: list[bool] = []

    async def call() -> None:
        async with http_exchange.within():
            started.append(True)

    with pytest.raises(CallError) as info:
        in_exchange("1S", 1.5, call)
    assert info.value.status == 504 and not started


def test_without_a_grpc_timeout_there_is_no_deadline() -> None:
    async def call() -> float | None:
        async with http_exchange.within() as deadline:
            await asyncio.sleep(0.01)
        return deadline

    assert in_exchange(None, 3600, call) is None


def test_a_malformed_grpc_timeout_is_the_callers_400() -> None:
    async def call() -> None:
        async with http_exchange.within():
            pass

    with pytest.raises(CallError) as info:
        in_exchange("soon", 0, call)
    assert (info.value.status, info.value.field) == (400, "grpc-timeout")


# ------------------------------------------------------------------ through the routes


@pytest.fixture(scope="module")
def served(demo_checkpoint: Path) -> Iterator[InProcessServer]:
    with demo_server(demo_checkpoint, http_port=free_port(), served_model_name=(MODEL,)) as server:
        yield server


class SlowParts:
    """The servicer's methods, as the HTTP listener calls them, each after a delay; the calls
    started, in order."""

    def __init__(self, served: InProcessServer, monkeypatch: pytest.MonkeyPatch):
        self.servicer = served.server.servicer
        self.monkeypatch = monkeypatch
        self.started: list[str] = []

    def unary(self, rpc: str, seconds: float) -> None:
        original = getattr(self.servicer, rpc)

        async def slow(request: Any, context: Any) -> Any:
            self.started.append(rpc)
            await asyncio.sleep(seconds)
            return await original(request, context)

        self.monkeypatch.setattr(self.servicer, rpc, slow)

    def stream(self, deltas: int, every: float) -> None:
        """GenerateStream as `deltas` words, one every `every` seconds, then its final."""

        async def slow(request: Any, context: Any) -> AsyncIterator[pb.GenerateStreamResponse]:
            self.started.append("GenerateStream")
            for _ in range(deltas):
                await asyncio.sleep(every)
                yield pb.GenerateStreamResponse(delta="word ")
            final = pb.GenerateResponse(
                text="word " * deltas,
                finish_reason=pb.FINISH_REASON_LENGTH,
                completion_tokens=deltas,
            )
            yield pb.GenerateStreamResponse(final=final)

        self.monkeypatch.setattr(self.servicer, "GenerateStream", slow)


@pytest.fixture
def slow(served: InProcessServer, monkeypatch: pytest.MonkeyPatch) -> SlowParts:
    return SlowParts(served, monkeypatch)


def post(
    served: InProcessServer, path: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, list[str], float]:
    """(status, the answer's lines, seconds it took to the last byte)."""
    conn = http.client.HTTPConnection("127.0.0.1", served.settings.http_port, timeout=20)
    start = time.monotonic()
    method = "GET" if body is None else "POST"
    conn.request(method, path, None if body is None else json.dumps(body), headers or {})
    response = conn.getresponse()
    lines = [line for line in response.read().decode().splitlines() if line]
    took = time.monotonic() - start
    conn.close()
    return response.status, lines, took


def test_a_chat_completion_ends_at_its_deadline_whatever_its_parts(
    served: InProcessServer, slow: SlowParts
) -> None:
    # Each part takes 1.2 s, within the 2 s timeout; the three take 3.6 s.
    slow.unary("Classify", 1.2)
    slow.unary("Generate", 1.2)
    status, lines, took = post(served, "/v1/chat/completions", CHAT, {"grpc-timeout": "2S"})
    error = json.loads(lines[0])["error"]
    assert (status, error["status"]) == (504, "DEADLINE_EXCEEDED"), lines
    assert took < 2.0 + MARGIN, took
    # Cut during the generation; scoring the answer never started.
    assert slow.started == ["Classify", "Generate"]


def test_a_chat_stream_under_way_ends_at_its_deadline_with_an_error_event(
    served: InProcessServer, slow: SlowParts
) -> None:
    # Scoring the input takes 1.5 s, the stream 2.4 s, each within the 3 s timeout.
    slow.unary("Classify", 1.5)
    slow.stream(deltas=6, every=0.4)
    body = {**CHAT, "stream": True}
    status, events, took = post(served, "/v1/chat/completions", body, {"grpc-timeout": "3S"})
    assert status == 200 and events[-1] == "data: [DONE]", events
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[-1]["error"]["status"] == "DEADLINE_EXCEEDED", chunks[-1]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert 0 < text.count("word") < 6  # the words sent before the deadline stay sent
    assert took < 3.0 + MARGIN, took
    assert slow.started == ["Classify", "GenerateStream"]


def test_without_a_grpc_timeout_a_chat_completion_takes_what_its_parts_take(
    served: InProcessServer, slow: SlowParts
) -> None:
    slow.unary("Classify", 0.3)
    slow.unary("Generate", 0.3)
    status, lines, _ = post(served, "/v1/chat/completions", CHAT)
    answer = json.loads(lines[0])
    assert status == 200 and answer["object"] == "chat.completion", answer
    assert answer["moderation"]["input"] and answer["moderation"]["output"], answer
    assert slow.started == ["Classify", "Generate", "Classify"]

    slow.started.clear()
    slow.stream(deltas=3, every=0.3)
    status, events, _ = post(served, "/v1/chat/completions", {**CHAT, "stream": True})
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert status == 200 and events[-1] == "data: [DONE]"
    assert all("error" not in c for c in chunks), chunks
    assert chunks[-1]["moderation"]["output"], chunks[-1]
    assert slow.started == ["Classify", "GenerateStream", "Classify"]


@pytest.mark.parametrize("path", ["/v1/models", f"/v1/models/{MODEL}"])
def test_the_model_routes_end_at_the_deadline(
    served: InProcessServer, slow: SlowParts, path: str
) -> None:
    slow.unary("GetModelInfo", 2.0)
    status, lines, took = post(served, path, None, {"grpc-timeout": "500m"})
    assert (status, json.loads(lines[0])["error"]["status"]) == (504, "DEADLINE_EXCEEDED")
    assert took < 0.5 + MARGIN, took
    status, lines, _ = post(served, path, None)
    assert status == 200, lines
