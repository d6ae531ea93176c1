"""ModerateStream end to end: a real server on the demo checkpoint (real engine, fp32), real
gRPC calls. The verdicts come every N tokens, the released offsets grow to the whole text, the
final verdict equals Classify of the complete answer in the same context within 1e-4, a flag
ends the stream, bad input fails naming the field, the limits hold, and a caller that hangs up
frees the check's cache slot."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import grpc
import pytest

from moderation.api.client import ModerationClient, ModerationError
from moderation.api.guard import chunk_texts, guard_openai_stream
from moderation.serving.worker.worker_thread import WorkerThread
from moderation.v1 import moderation_pb2 as pb
from moderation.v1 import moderation_pb2_grpc as pb_grpc
from tests.servers import InProcessServer, demo_server, free_port, invalid_field

PROMPT = "Tell me about the weather in Paris."
ANSWER = (
    "Paris has mild weather: cool winters, warm summers and rain spread over the year. "
    "In spring — April and May — the city is at its best; pack a light coat. 🌦️ Température "
    "moyenne: 12 °C.\r\nIn summer it can reach 35 °C [in the shade], so drink water."
)


@pytest.fixture(scope="module")
def served(demo_checkpoint: Path) -> Iterator[InProcessServer]:
    with demo_server(
        demo_checkpoint,
        max_batch_size=4,
        max_stream_checks=2,
        stream_max_answer_chars=2000,
        stream_idle_timeout=3.0,
        http_port=free_port(),
    ) as server:
        yield server


@pytest.fixture(scope="module")
def client(served: InProcessServer) -> Iterator[ModerationClient]:
    with ModerationClient(served.address) as c:
        yield c


def pieces(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(text):
        k = rng.randint(1, 9)
        out.append(text[i : i + k])
        i += k
    return out


def engine_slots_free(served: InProcessServer) -> int:
    worker = served.server.state.worker
    assert isinstance(worker, WorkerThread)
    return worker.scheduler.engine.free_slots


def wait_until(condition: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.05)


def test_final_verdict_equals_classify_of_the_whole_answer(
    client: ModerationClient, stub: pb_grpc.ModerationServiceStub
) -> None:
    verdicts = list(
        client.moderate_stream(
            pieces(ANSWER, 1), prompt=PROMPT, policy="mistral-13", check_tokens=8, threshold=1.0
        )
    )
    whole = stub.Classify(
        pb.ClassifyRequest(
            text=ANSWER, role=pb.ROLE_OUTPUT, prompt=PROMPT, policy="mistral-13", threshold=1.0
        )
    )
    last = verdicts[-1]
    assert last.complete and not last.result.flagged
    assert last.released_chars == len(ANSWER)
    assert last.result.prompt_tokens == whole.prompt_tokens
    assert last.result.context_tokens == whole.context_tokens > 0
    assert last.result.scores.keys() == whole.scores.keys()
    for k, v in whole.scores.items():
        assert last.result.scores[k] == pytest.approx(v, abs=1e-4)
    # every 8 tokens, then the rest; released offsets grow, never past what was sent
    checked = [v.checked_tokens for v in verdicts]
    assert checked[:-1] == list(range(8, 8 * len(checked[:-1]) + 1, 8))
    assert 0 < checked[-1] - checked[-2] <= 8
    released = [v.released_chars for v in verdicts]
    assert released == sorted(released) and 0 < released[0] < len(ANSWER)
    assert all(not v.complete for v in verdicts[:-1])


def test_utf8_pieces_may_end_inside_a_character(
    client: ModerationClient, stub: pb_grpc.ModerationServiceStub
) -> None:
    data = ANSWER.encode()
    rng = random.Random(9)
    cuts = sorted(rng.sample(range(1, len(data)), 60))
    pieces_ = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    assert any(_inside_a_character(p) for p in pieces_)
    last = list(client.moderate_stream(pieces_, prompt=PROMPT, threshold=1.0))[-1]
    whole = stub.Classify(
        pb.ClassifyRequest(text=ANSWER, role=pb.ROLE_OUTPUT, prompt=PROMPT, threshold=1.0)
    )
    assert last.complete and last.released_chars == len(ANSWER)
    for k, v in whole.scores.items():
        assert last.result.scores[k] == pytest.approx(v, abs=1e-4)


def _inside_a_character(piece: bytes) -> bool:
    try:
        piece.decode()
    except UnicodeDecodeError:
        return True
    return False


def test_a_conversation_is_judged_as_classify_judges_it(
    client: ModerationClient, stub: pb_grpc.ModerationServiceStub
) -> None:
    conversation = [
        {"role": "system", "content": "You are a travel agent."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! Where to?"},
        {"role": "user", "content": PROMPT},
    ]
    verdicts = client.moderate_stream(pieces(ANSWER, 2), messages=conversation, threshold=1.0)
    last = list(verdicts)[-1]
    whole = stub.Classify(
        pb.ClassifyRequest(
            messages=[
                pb.ChatMessage(**m)
                for m in [*conversation, {"role": "assistant", "content": ANSWER}]
            ]
        )
    )
    assert last.complete and last.result.context_tokens == whole.context_tokens
    for k, v in whole.scores.items():
        assert last.result.scores[k] == pytest.approx(v, abs=1e-4)


def test_a_flag_is_the_last_message(client: ModerationClient) -> None:
    # threshold 0: the first check flags whatever the scores
    verdicts = list(client.moderate_stream(pieces(ANSWER, 3), prompt=PROMPT, threshold=0.0))
    assert len(verdicts) == 1
    assert verdicts[0].result.flagged and not verdicts[0].complete
    assert verdicts[0].released_chars == 0 and verdicts[0].checked_tokens == 16
    # per-category thresholds: only the listed category counts
    by_category = list(
        client.moderate_stream(
            pieces(ANSWER, 3), prompt=PROMPT, category_thresholds={"unqualified_advice": 0.0}
        )
    )
    assert len(by_category) == 1 and by_category[0].result.flagged
    assert dict(by_category[0].result.categories) == {
        "illegal_activities": False,
        "hateful_harassing_violent": False,
        "unqualified_advice": True,
    }


def test_the_openai_stream_guard_yields_only_checked_text(client: ModerationClient) -> None:
    def chunk(content: str | None, index: int = 0) -> Any:
        delta = SimpleNamespace(content=content, role=None)
        return SimpleNamespace(choices=[SimpleNamespace(index=index, delta=delta)])

    chunks = [chunk(None), *(chunk(p) for p in pieces(ANSWER, 4)), chunk("ignored", index=1)]
    assert "".join(chunk_texts(chunks)) == ANSWER
    guarded = guard_openai_stream(
        client, iter(chunks), prompt=PROMPT, check_tokens=8, threshold=1.0
    )
    out = list(guarded)
    assert guarded.complete and not guarded.flagged
    assert "".join(out) == ANSWER and len(out) > 2  # released piece by piece
    stopped = guard_openai_stream(client, iter(chunks), prompt=PROMPT, threshold=0.0)
    assert list(stopped) == [] and stopped.flagged


def expect_invalid(
    stub: pb_grpc.ModerationServiceStub, requests: list[pb.ModerateStreamRequest]
) -> str:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.ModerateStream(iter(requests), timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    return invalid_field(info.value)


def test_bad_streams_fail_naming_the_field(stub: pb_grpc.ModerationServiceStub) -> None:
    Open, Req = pb.ModerateStreamOpen, pb.ModerateStreamRequest
    assert expect_invalid(stub, [Req(delta="hi"), Req(done=True)]) == "open"
    assert expect_invalid(stub, [Req(open=Open(policy="nope"), done=True)]) == "open.policy"
    assert expect_invalid(stub, [Req(open=Open(check_tokens=5000))]) == "open.check_tokens"
    assert expect_invalid(stub, [Req(open=Open(threshold=2.0))]) == "open.threshold"
    assert expect_invalid(stub, [Req(open=Open()), Req(delta="hi")]) == "done"
    assert expect_invalid(stub, [Req(open=Open()), Req(open=Open())]) == "open"
    assert expect_invalid(stub, [Req(open=Open(), delta=" \n ", done=True)]) == "delta"
    euro = "€".encode()
    assert expect_invalid(stub, [Req(open=Open(), delta_bytes=b"\xff", done=True)]) == "delta_bytes"
    half = [Req(open=Open(), delta_bytes=euro[:2]), Req(delta="x")]
    assert expect_invalid(stub, half) == "delta_bytes"
    assert expect_invalid(stub, [half[0], Req(done=True)]) == "delta_bytes"
    too_long = [Req(open=Open()), *(Req(delta="word " * 100) for _ in range(5)), Req(done=True)]
    assert expect_invalid(stub, too_long) == "delta"  # past stream_max_answer_chars (2000)


def test_an_idle_caller_and_too_many_checks_are_refused(
    served: InProcessServer, stub: pb_grpc.ModerationServiceStub
) -> None:
    gate = threading.Event()

    def held() -> Iterator[pb.ModerateStreamRequest]:
        yield pb.ModerateStreamRequest(open=pb.ModerateStreamOpen(), delta="Hello there")
        gate.wait(30)

    calls = [stub.ModerateStream(held(), timeout=60) for _ in range(2)]
    wait_until(lambda: served.server.state.open_checks == 2)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.ModerateStream(iter([pb.ModerateStreamRequest(open=pb.ModerateStreamOpen())])))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "MODERATION_MAX_STREAM_CHECKS" in info.value.details()
    for call in calls:  # silent past stream_idle_timeout (3 s)
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "MODERATION_STREAM_IDLE_TIMEOUT" in info.value.details()
    gate.set()
    wait_until(lambda: served.server.state.open_checks == 0)


def test_a_caller_that_hangs_up_frees_its_slot(
    served: InProcessServer, stub: pb_grpc.ModerationServiceStub
) -> None:
    free = engine_slots_free(served)
    sent = threading.Event()
    gate = threading.Event()

    def requests() -> Iterator[pb.ModerateStreamRequest]:
        yield pb.ModerateStreamRequest(open=pb.ModerateStreamOpen(check_tokens=4, threshold=1.0))
        yield pb.ModerateStreamRequest(delta=ANSWER[:60])
        sent.set()
        gate.wait(30)

    call = stub.ModerateStream(requests(), timeout=60)
    first = next(call)
    assert first.checked_tokens == 4 and not first.complete
    assert engine_slots_free(served) == free - 1  # the check holds one slot
    call.cancel()
    gate.set()
    wait_until(lambda: served.server.state.open_checks == 0)
    wait_until(lambda: engine_slots_free(served) == free)
    assert not served.server.state.worker.scheduler._answers.open  # type: ignore[union-attr]


def test_get_model_info_reports_the_stream_limits(stub: pb_grpc.ModerationServiceStub) -> None:
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.stream_check_tokens, info.max_stream_checks, info.stream_max_answer_chars) == (
        16,
        2,
        2000,
    )


def test_client_errors_are_moderation_errors(client: ModerationClient) -> None:
    with pytest.raises(ModerationError) as info:
        list(client.moderate_stream(["hi"], policy="nope"))
    assert info.value.field == "open.policy"


# ------------------------------------------------------------------ over HTTP: a WebSocket


def http_port(server: InProcessServer) -> int:
    assert server.server.http is not None and server.server.http.port is not None
    return server.server.http.port


async def websocket(
    port: int, messages: list[Any], *, headers: dict[str, str] | None = None, hang_up: bool = False
) -> tuple[list[Any], int | None]:
    """Send `messages` (JSON) on the route's WebSocket, read every answer until it closes (or
    hang up after the first): the answers and the close code."""
    url = f"http://127.0.0.1:{port}/v1/moderate/stream"
    async with aiohttp.ClientSession() as session, session.ws_connect(url, headers=headers) as ws:
        for m in messages:
            await ws.send_str(json.dumps(m))
        answers = []
        async for message in ws:
            answers.append(json.loads(message.data))
            if hang_up:
                break
        return answers, ws.close_code


def test_over_a_websocket_the_verdicts_are_the_same(
    served: InProcessServer, stub: pb_grpc.ModerationServiceStub
) -> None:
    port = http_port(served)
    opened = {"open": {"prompt": PROMPT, "checkTokens": 8, "threshold": 1.0}}
    messages = [opened, *({"delta": p} for p in pieces(ANSWER, 5)), {"done": True}]
    answers, code = asyncio.run(websocket(port, messages))
    assert code == aiohttp.WSCloseCode.OK
    last = answers[-1]["result"]
    assert last["complete"] and int(last["releasedChars"]) == len(ANSWER)
    assert [int(a["result"]["checkedTokens"]) for a in answers[:3]] == [8, 16, 24]
    whole = stub.Classify(
        pb.ClassifyRequest(text=ANSWER, role=pb.ROLE_OUTPUT, prompt=PROMPT, threshold=1.0)
    )
    for k, v in whole.scores.items():
        assert last["result"]["scores"][k] == pytest.approx(v, abs=1e-4)


def test_websocket_errors_name_the_field_and_close(served: InProcessServer) -> None:
    port = http_port(served)
    for messages, field in (
        ([{"delta": "hi"}], "open"),
        ([{"open": {"policy": "nope"}, "done": True}], "open.policy"),
        ([{"open": {}, "bogus": 1}], "bogus"),
        ([{"open": {}}, {"delta": 5}], "delta"),
    ):
        answers, code = asyncio.run(websocket(port, messages))
        assert code == aiohttp.WSCloseCode.POLICY_VIOLATION
        assert answers[-1]["error"]["status"] == "INVALID_ARGUMENT"
        assert answers[-1]["error"]["field"] == field

    from moderation.serving.http.moderate_stream import close_code

    assert close_code(grpc.StatusCode.RESOURCE_EXHAUSTED) == 1013
    assert close_code(grpc.StatusCode.INTERNAL) == 1011

    # without an upgrade: an ordinary JSON error
    async def plain_get() -> int:
        url = f"http://127.0.0.1:{port}/v1/moderate/stream"
        async with aiohttp.ClientSession() as session, session.get(url) as r:
            return r.status

    assert asyncio.run(plain_get()) == 400


def test_a_websocket_caller_that_hangs_up_frees_its_check(served: InProcessServer) -> None:
    port = http_port(served)
    free = engine_slots_free(served)
    opened = {"open": {"checkTokens": 4, "threshold": 1.0}, "delta": ANSWER[:80]}
    answers, _ = asyncio.run(websocket(port, [opened], hang_up=True))
    assert int(answers[0]["result"]["checkedTokens"]) == 4
    wait_until(lambda: served.server.state.open_checks == 0)
    wait_until(lambda: engine_slots_free(served) == free)


def test_the_websocket_and_the_rpc_need_the_token(demo_checkpoint: Path) -> None:
    with demo_server(demo_checkpoint, http_port=free_port(), auth_token="s3cret") as server:
        stub = pb_grpc.ModerationServiceStub(grpc.insecure_channel(server.address))
        opened = pb.ModerateStreamRequest(open=pb.ModerateStreamOpen(), delta="hi", done=True)
        with pytest.raises(grpc.RpcError) as denied:
            list(stub.ModerateStream(iter([opened]), timeout=30))
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
        token = (("authorization", "Bearer s3cret"),)
        assert list(stub.ModerateStream(iter([opened]), timeout=30, metadata=token))
        port = http_port(server)
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            asyncio.run(websocket(port, [{"open": {}, "delta": "hi", "done": True}]))
        assert info.value.status == 401
        answers, code = asyncio.run(
            websocket(
                port,
                [{"open": {"threshold": 1.0}, "delta": "hi there", "done": True}],
                headers={"Authorization": "Bearer s3cret"},
            )
        )
        assert code == aiohttp.WSCloseCode.OK and answers[-1]["result"]["complete"]


def test_an_undecodable_message_is_invalid_and_the_call_is_logged(
    served: InProcessServer,
) -> None:
    channel = grpc.insecure_channel(served.address)
    raw = channel.stream_stream("/moderation.v1.ModerationService/ModerateStream")
    first = pb.ModerateStreamRequest(open=pb.ModerateStreamOpen()).SerializeToString()
    with pytest.raises(grpc.RpcError) as info:
        list(raw(iter([first, b"\xff\xff\xff"]), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert invalid_field(info.value) == "message"
    handled = served.server.state.metrics.handled.labels(
        "bidi_stream", "moderation.v1.ModerationService", "ModerateStream", "InvalidArgument"
    )
    wait_until(lambda: handled._value.get() >= 1)  # counted as the call ends, after the status


def test_silence_while_a_verdict_is_owed_is_not_idleness() -> None:
    from moderation.serving.grpc.moderate_stream import _next, _Owed
    from moderation.serving.worker import DeadlineExpiredError

    async def main() -> None:
        gate = asyncio.Event()

        async def requests() -> Any:
            await gate.wait()
            yield pb.ModerateStreamRequest(done=True)

        # 8 tokens fed, none answered, a check every 4: the caller waits for us
        waiting = asyncio.create_task(_next(requests(), 0.05, _Owed(4, fed=8)))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        gate.set()
        message = await waiting
        assert message is not None and message.done
        gate.clear()
        with pytest.raises(DeadlineExpiredError):  # nothing owed: silence is idleness
            await _next(requests(), 0.05, _Owed(4, fed=2))

    asyncio.run(main())


def test_a_read_cancelled_as_the_stream_ends_leaves_no_unretrieved_error() -> None:
    """A caller that hangs up ends its stream and cancels the call at once (aiohttp's handler
    cancellation): the read that ended must not be logged as an error "never retrieved"."""
    import gc

    from moderation.serving.grpc.moderate_stream import _next

    async def main() -> list[dict[str, Any]]:
        errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, context: errors.append(context)
        )
        gate = asyncio.Event()

        async def requests() -> Any:
            await gate.wait()
            return
            yield  # an async generator that ends when the gate opens

        reading = asyncio.create_task(_next(requests(), 10.0))
        await asyncio.sleep(0.01)
        gate.set()  # the stream ends: the pending read finishes first...
        reading.cancel()  # ...and the call is cancelled in the same turn of the loop
        with pytest.raises(asyncio.CancelledError):
            await reading
        del reading
        gc.collect()
        await asyncio.sleep(0)
        return errors

    errors = asyncio.run(main())
    assert not [e for e in errors if "never retrieved" in str(e.get("message"))], errors


def test_an_answer_past_the_prompts_room_is_refused(served: InProcessServer) -> None:
    """The answer may take what Classify would take whole beside its context (the `room`
    Planner.plan_answer_stream gives): past it, INVALID_ARGUMENT naming `delta`."""
    from moderation.core.answer_text import AnswerTokens
    from moderation.core.errors import InvalidArgument
    from moderation.serving.grpc.moderate_stream import _feed

    front = served.server.state.front
    assert front is not None
    fed: list[list[int]] = []
    check = SimpleNamespace(feed=lambda tokens, end=False: fed.append(list(tokens)))
    answer = AnswerTokens(front.planner.tokenizer)
    tokens = answer.push("one two three four five six ")
    _feed(check, tokens, answer, room=len(tokens))  # type: ignore[arg-type]
    assert fed == [tokens]
    more = answer.push("seven eight ")
    with pytest.raises(InvalidArgument) as info:
        _feed(check, more, answer, room=len(tokens))  # type: ignore[arg-type]
    assert info.value.field == "delta" and len(fed) == 1
