"""The serving path's own shortcuts keep the service's rules: one size rule (serving.
planning_threads) puts a caller's small input on the event loop (cheaper than a thread hop)
and a large one on the planning threads, on every transport: gRPC, HTTP, and ModerateStream
over gRPC and over a WebSocket."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from moderation.core.answer_text import AnswerTokens
from moderation.core.planning import Planner
from moderation.serving.http import bodies
from moderation.serving.http import moderate_stream as websocket_route
from moderation.serving.planning_threads import INLINE_BYTES, THREAD_PREFIX, PlanningThreads
from moderation.v1 import moderation_pb2 as pb
from moderation.v1 import moderation_pb2_grpc as pb_grpc
from tests.servers import InProcessServer, demo_server, free_port, http_call

SMALL = "a short text"
LARGE = "word " * (INLINE_BYTES // 4)  # past the rule's size, as text, JSON or protobuf


def on_planning_thread() -> bool:
    return threading.current_thread().name.startswith(f"{THREAD_PREFIX}_")


def test_the_rule_runs_small_work_here_and_large_work_on_the_planning_threads() -> None:
    planning = PlanningThreads(1)
    sizes = (0, INLINE_BYTES, INLINE_BYTES + 1, 100 * INLINE_BYTES)

    async def where() -> list[bool]:
        return [await planning.run(size, on_planning_thread) for size in sizes]

    try:
        assert [planning.inline(size) for size in sizes] == [True, True, False, False]
        assert asyncio.run(where()) == [False, False, True, True]
    finally:
        planning.shutdown()


@pytest.fixture(scope="module")
def served(demo_checkpoint: Path) -> Iterator[InProcessServer]:
    with demo_server(demo_checkpoint, http_port=free_port()) as server:
        yield server


class Where:
    """Which thread each recorded function ran on: True for a planning thread."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.monkeypatch = monkeypatch
        self.ran: dict[str, list[bool]] = {}

    def record(self, owner: Any, name: str) -> None:
        original = getattr(owner, name)
        ran = self.ran.setdefault(name, [])

        def recording(*args: Any, **kwargs: Any) -> Any:
            ran.append(on_planning_thread())
            return original(*args, **kwargs)

        self.monkeypatch.setattr(owner, name, recording)

    def take(self, *names: str) -> dict[str, list[bool]]:
        """What ran since the last take (of `names` only, when given)."""
        ran = {n: runs[:] for n, runs in self.ran.items() if runs and (n in names or not names)}
        for runs in self.ran.values():
            runs.clear()
        return ran


@pytest.fixture
def where(monkeypatch: pytest.MonkeyPatch) -> Where:
    recorder = Where(monkeypatch)
    recorder.record(Planner, "plan")  # Classify's validation and tokenizing
    recorder.record(bodies, "decode")  # an HTTP body
    recorder.record(Planner, "plan_answer_stream")  # a ModerateStream's opening message
    recorder.record(AnswerTokens, "push")  # its deltas
    recorder.record(websocket_route, "parse_message")  # a WebSocket message
    return recorder


def test_grpc_requests_are_planned_by_their_size(served: InProcessServer, where: Where) -> None:
    stub = pb_grpc.ModerationServiceStub(grpc.insecure_channel(served.address))
    stub.Classify(pb.ClassifyRequest(text=SMALL), timeout=60)
    assert where.take() == {"plan": [False]}
    stub.Classify(pb.ClassifyRequest(text=LARGE), timeout=60)
    assert where.take() == {"plan": [True]}


def test_http_bodies_are_decoded_and_planned_by_their_size(
    served: InProcessServer, where: Where
) -> None:
    url = f"http://127.0.0.1:{served.settings.http_port}/v1/classify"
    for text, threaded in ((SMALL, False), (LARGE, True)):
        status, _, answer = http_call(url, {"text": text}, method="POST")
        assert status == 200, answer
        assert where.take() == {"decode": [threaded], "plan": [threaded]}, text


def stream_messages(text: str) -> list[pb.ModerateStreamRequest]:
    return [
        # threshold 1: random weights flag nothing, so the check runs to `done`
        pb.ModerateStreamRequest(open=pb.ModerateStreamOpen(prompt=text, threshold=1.0)),
        pb.ModerateStreamRequest(delta=text),
        pb.ModerateStreamRequest(done=True),
    ]


def test_moderate_stream_over_grpc_plans_by_size(served: InProcessServer, where: Where) -> None:
    stub = pb_grpc.ModerationServiceStub(grpc.insecure_channel(served.address))
    for text, threaded in ((SMALL, False), (LARGE, True)):
        answers = list(stub.ModerateStream(iter(stream_messages(text)), timeout=60))
        assert answers[-1].complete
        # (plan_answer_stream plans its item with Planner.plan, where it runs itself)
        ran = where.take("plan_answer_stream", "push")
        assert ran == {"plan_answer_stream": [threaded], "push": [threaded]}, text


async def websocket(port: int, messages: list[pb.ModerateStreamRequest]) -> list[Any]:
    from google.protobuf import json_format

    url = f"http://127.0.0.1:{port}/v1/moderate/stream"
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        for m in messages:
            await ws.send_str(json.dumps(json_format.MessageToDict(m)))
        return [json.loads(message.data) async for message in ws]


def test_moderate_stream_over_a_websocket_parses_and_plans_by_size(
    served: InProcessServer, where: Where
) -> None:
    for text, threaded in ((SMALL, False), (LARGE, True)):
        answers = asyncio.run(websocket(served.settings.http_port, stream_messages(text)))
        assert answers[-1]["result"]["complete"], answers[-1]
        # Three messages parsed: the open and the delta carry the text, `done` is small.
        assert where.take("parse_message", "plan_answer_stream", "push") == {
            "parse_message": [threaded, threaded, False],
            "plan_answer_stream": [threaded],
            "push": [threaded],
        }, text
