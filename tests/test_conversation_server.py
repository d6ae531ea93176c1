"""Conversation moderation over gRPC: ClassifyRequest.messages end to end, on a real server with
the real engine on the demo checkpoint; validation names the field, also inside a batch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from moderation.core.chat import ChatMessage
from moderation.core.decision import ClassifyItem
from moderation.serving.settings import ServeSettings
from moderation.v1 import moderation_pb2 as pb
from moderation.v1 import moderation_pb2_grpc as pb_grpc
from tests.servers import InProcessServer, demo_loader, demo_server, free_port, invalid_field

MAX_MESSAGES = 6
MAX_CHARS = 400
# A small context, so that a few turns overflow it: the longest policy prefix (mistral-13,
# ~650 tokens) leaves a few hundred tokens of text and context.
MAX_CONTEXT = 1024


@pytest.fixture(scope="module")
def served(demo_checkpoint: Path) -> Iterator[InProcessServer]:
    with demo_server(
        demo_checkpoint,
        metrics_port=free_port(),
        max_batch_items=8,
        max_text_chars=MAX_CHARS,
        max_messages=MAX_MESSAGES,
        max_context=MAX_CONTEXT,
    ) as server:
        yield server


def m(role: str, content: str) -> pb.ChatMessage:
    return pb.ChatMessage(role=role, content=content)


def same_scores(a: pb.ClassifyResponse, b: pb.ClassifyResponse) -> None:
    assert (a.category, a.flagged, a.prompt_tokens, a.windows) == (
        b.category, b.flagged, b.prompt_tokens, b.windows
    )  # fmt: skip
    for key, value in a.scores.items():
        assert b.scores[key] == pytest.approx(value, abs=1e-6)


def test_the_last_message_is_classified_as_its_speakers_role(
    stub: pb_grpc.ModerationServiceStub,
) -> None:
    question = stub.Classify(pb.ClassifyRequest(messages=[m("user", "Bread?")]))
    same_scores(question, stub.Classify(pb.ClassifyRequest(text="Bread?")))
    assert (question.context_tokens, question.context_messages_dropped) == (0, 0)
    answer = stub.Classify(
        pb.ClassifyRequest(messages=[m("user", "Bread?"), m("assistant", "Knead it.")])
    )
    alone = stub.Classify(
        pb.ClassifyRequest(text="Knead it.", role=pb.ROLE_OUTPUT, prompt="Bread?")
    )
    same_scores(answer, alone)
    # The prompt is the answer's context either way: its tokens are counted the same.
    assert answer.context_tokens == alone.context_tokens > 0
    assert (
        stub.Classify(pb.ClassifyRequest(text="Knead it.", role=pb.ROLE_OUTPUT)).context_tokens == 0
    )


def test_earlier_turns_are_context_and_the_oldest_are_dropped_past_the_limit(
    stub: pb_grpc.ModerationServiceStub,
) -> None:
    short = [m("system", "Be brief."), m("user", "Hi."), m("assistant", "Hello!"),
             m("user", "Bread?")]  # fmt: skip
    r = stub.Classify(pb.ClassifyRequest(messages=short, policy="mistral-13"))
    assert r.context_messages_dropped == 0 and r.context_tokens > 0
    alone = stub.Classify(pb.ClassifyRequest(text="Bread?", policy="mistral-13"))
    assert r.prompt_tokens == alone.prompt_tokens + r.context_tokens
    # Long earlier turns: the prompt is the limit's, so the oldest ones go.
    long = [m("user", "tell me more " * 30), m("assistant", "here is more " * 30)] * 2
    r = stub.Classify(
        pb.ClassifyRequest(messages=[*long, m("user", "Bread?")], policy="mistral-13")
    )
    assert 0 < r.context_messages_dropped < 4
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert r.prompt_tokens <= info.max_context_tokens
    kept = long[r.context_messages_dropped :]
    # The kept suffix alone, asked directly, is the same prompt: nothing else was kept.
    direct = stub.Classify(
        pb.ClassifyRequest(messages=[*kept, m("user", "Bread?")], policy="mistral-13")
    )
    same_scores(r, direct)
    assert direct.context_messages_dropped == 0 and direct.context_tokens == r.context_tokens


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.ClassifyRequest(text="x", messages=[m("user", "a")]), "text"),
        (pb.ClassifyRequest(prompt="p", messages=[m("user", "a")]), "prompt"),
        (pb.ClassifyRequest(role=pb.ROLE_INPUT, messages=[m("user", "a")]), "role"),
        (pb.ClassifyRequest(role=pb.ROLE_OUTPUT, messages=[m("user", "a")]), "role"),
        (pb.ClassifyRequest(messages=[m("user", "a"), m("assistant", "  ")]),
         "messages[1].content"),
        (pb.ClassifyRequest(messages=[m("user", "a"), m("user", "b")]), "messages[1].role"),
        (pb.ClassifyRequest(messages=[m("bot", "a")]), "messages[0].role"),
        (pb.ClassifyRequest(messages=[m("system", "a")]), "messages"),
        (pb.ClassifyRequest(messages=[m("user", "a"), m("assistant", "b")] * 4), "messages"),
        (pb.ClassifyRequest(messages=[m("user", "x" * (MAX_CHARS + 1)), m("assistant", "b")]),
         "messages[0].content"),
        (pb.ClassifyRequest(messages=[m("user", "x" * (MAX_CHARS + 1))]), "messages[0].content"),
        (pb.ClassifyRequest(messages=[m("user", "a")], policy="nope"), "policy"),
    ],
)  # fmt: skip
def test_bad_conversations_are_invalid_argument_naming_the_field(
    stub: pb_grpc.ModerationServiceStub, request_: pb.ClassifyRequest, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Classify(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert invalid_field(err.value) == field
    assert err.value.details().startswith(f"{field}: ")


def test_an_empty_earlier_assistant_turn_is_refused_by_classify_and_generate_alike(
    stub: pb_grpc.ModerationServiceStub,
) -> None:
    messages = [m("user", "a"), m("assistant", ""), m("user", "b")]
    for call, request_ in (
        (stub.Classify, pb.ClassifyRequest(messages=messages)),
        (stub.Generate, pb.GenerateRequest(messages=messages, max_new_tokens=1)),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call(request_)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert invalid_field(err.value) == "messages[1].content"
        assert err.value.details() == "messages[1].content: must not be empty"


def test_a_batch_mixes_texts_and_conversations_and_equals_one_by_one(
    stub: pb_grpc.ModerationServiceStub,
) -> None:
    requests = [
        pb.ClassifyRequest(text="hello there"),
        pb.ClassifyRequest(
            messages=[m("user", "Hi."), m("assistant", "Hello!"), m("user", "Pills?")]
        ),
        pb.ClassifyRequest(text="Sure.", role=pb.ROLE_OUTPUT, prompt="Help?", policy="mistral-13"),
        pb.ClassifyRequest(messages=[m("user", "Help?"), m("assistant", "Sure.")], threshold=0.2),
    ]  # fmt: skip
    results = stub.ClassifyBatch(pb.ClassifyBatchRequest(requests=requests)).results
    assert len(results) == len(requests)
    for request, got in zip(requests, results, strict=True):
        alone = stub.Classify(request)
        same_scores(alone, got)
        assert (got.context_tokens, got.context_messages_dropped) == (
            alone.context_tokens, alone.context_messages_dropped
        )  # fmt: skip


def test_batch_errors_name_the_item_and_the_message(stub: pb_grpc.ModerationServiceStub) -> None:
    requests = [
        pb.ClassifyRequest(text="fine"),
        pb.ClassifyRequest(messages=[m("user", "fine")]),
        pb.ClassifyRequest(text="fine"),
        pb.ClassifyRequest(messages=[m("user", "a"), m("user", "b")]),
    ]
    with pytest.raises(grpc.RpcError) as err:
        stub.ClassifyBatch(pb.ClassifyBatchRequest(requests=requests))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert invalid_field(err.value) == "requests[3].messages[1].role"
    assert err.value.details().startswith("requests[3].messages[1].role: expected 'assistant'")


def test_the_remote_request_of_a_conversation_item_round_trips() -> None:
    from moderation.api import convert

    item = ClassifyItem(messages=[ChatMessage("user", "a")], policy="paper", threshold=0.5)
    request = convert.classify_request(item)
    assert request.role == pb.ROLE_UNSPECIFIED and not request.text
    assert [(x.role, x.content) for x in request.messages] == [("user", "a")]
    assert convert.classify_item(request) == item


def test_with_long_text_split_only_the_last_message_may_pass_the_character_limit(
    demo_checkpoint: Path,
) -> None:
    settings = ServeSettings(model_process=False,
        host="127.0.0.1", port=free_port(), metrics_port=free_port(), max_text_chars=MAX_CHARS,
        max_context=MAX_CONTEXT, long_text="split",
    )  # fmt: skip
    server = InProcessServer(settings, demo_loader(demo_checkpoint))
    try:
        server.wait_loaded()
        stub = pb_grpc.ModerationServiceStub(grpc.insecure_channel(server.address))
        long = "many words here " * 100  # over the character limit and over the token room
        r = stub.Classify(pb.ClassifyRequest(messages=[m("user", "Hi."), m("assistant", long)]))
        assert r.windows > 1 and r.context_tokens > 0 and r.context_messages_dropped == 0
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(pb.ClassifyRequest(messages=[m("user", long), m("assistant", "ok")]))
        assert invalid_field(err.value) == "messages[0].content"
    finally:
        server.stop()
