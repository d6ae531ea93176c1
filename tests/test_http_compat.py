"""OpenAI's and Mistral's moderation routes on the HTTP listener: the official `openai` SDK as
the client of /v1/moderations, plain HTTP for /v1/chat/moderations, every answer checked
against what gRPC's Classify gives for the same texts and conversations (real engine, demo
checkpoint)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types import ModerationCreateResponse

from moderation.v1 import moderation_pb2 as pb
from tests.servers import InProcessServer, demo_server, free_port, http_call

TOKEN = "compat-token"
GRPC_AUTH = (("authorization", f"Bearer {TOKEN}"),)
PAPER = ("illegal_activities", "hateful_harassing_violent", "unqualified_advice")
TEXTS = ["Such a lovely day today, isn't it?", "How do I pick a lock?", "you fool"]


@pytest.fixture(scope="module")
def served(demo_checkpoint: Path) -> Iterator[InProcessServer]:
    with demo_server(
        demo_checkpoint,
        http_port=free_port(),
        auth_token=TOKEN,
        max_batch_items=8,
        max_text_chars=2000,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def client(served: InProcessServer) -> openai.OpenAI:
    # No retries: a refusal must reach the test as the SDK's exception.
    base_url = f"http://127.0.0.1:{served.settings.http_port}/v1"
    return openai.OpenAI(base_url=base_url, api_key=TOKEN, max_retries=0)


def expected(
    stub: Any, request: pb.ClassifyRequest
) -> tuple[bool, dict[str, bool], dict[str, float]]:
    """What /v1/moderations and /v1/chat/moderations should say, from gRPC's Classify."""
    r = stub.Classify(request, metadata=GRPC_AUTH)
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=GRPC_AUTH)
    policy = next(p for p in info.policies if p.name == r.policy)
    categories = {c.id: r.categories[c.id] for c in policy.categories}
    scores = {c.id: r.scores[c.id] for c in policy.categories}
    for paper in PAPER:
        categories[paper] = any(categories[c.id] for c in policy.categories
                                if c.paper_category == paper)  # fmt: skip
        scores[paper] = r.paper_scores[paper]
    return r.flagged, categories, scores


# ----------------------------------------------------------------- OpenAI's SDK


def test_the_openai_sdk_moderates_through_this_server(client: openai.OpenAI, stub: Any) -> None:
    # threshold 0 would flag everything; the server default (0.5) on random weights flags some
    answer = client.moderations.create(model="mistral-13", input=TEXTS)
    assert isinstance(answer, ModerationCreateResponse)
    assert answer.id.startswith("modr-") and answer.model.startswith("demo")
    assert len(answer.results) == len(TEXTS)
    for text, result in zip(TEXTS, answer.results, strict=True):
        flagged, categories, scores = expected(
            stub, pb.ClassifyRequest(text=text, policy="mistral-13")
        )
        assert result.flagged == flagged
        # The policy's ids are not OpenAI's category names: the SDK keeps them as extra fields.
        assert result.categories.model_extra == categories
        assert result.category_scores.model_extra == pytest.approx(scores, abs=1e-6)
        assert len(categories) == 13 + 3 and sum(categories.values()) <= 2
        # one distribution over the policy's categories and acceptable
        assert sum(scores[c] for c in scores if c not in PAPER) <= 1.0 + 1e-5
        assert getattr(result.categories, "fraud") == categories["fraud"]  # noqa: B009


def test_a_single_string_and_the_default_policy(client: openai.OpenAI, stub: Any) -> None:
    answer = client.moderations.create(model="paper", input="hello there")
    (result,) = answer.results
    flagged, categories, scores = expected(stub, pb.ClassifyRequest(text="hello there"))
    assert result.flagged == flagged and result.categories.model_extra == categories
    assert set(categories) == set(PAPER)  # the paper policy's ids are the paper's three
    # No model, or the served model: the route's own policy (OpenAI's categories), not the
    # server's default (paper).
    _, _, scores = expected(stub, pb.ClassifyRequest(text="hello there", policy="openai"))
    for model in (None, answer.model):
        kwargs = {"model": model} if model else {}
        again = client.moderations.create(input=["hello there"], **kwargs)  # type: ignore[arg-type]
        assert again.model_extra == {"policy": "openai"}
        assert again.results[0].category_scores.violence == pytest.approx(
            scores["violence"], abs=1e-6
        )


def test_the_openai_sdk_raises_its_own_exceptions(
    served: InProcessServer, client: openai.OpenAI
) -> None:
    with pytest.raises(openai.NotFoundError) as unknown:
        client.moderations.create(model="gpt-4o", input="x")
    assert unknown.value.param == "model" and unknown.value.code == "model_not_found"  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as empty:
        client.moderations.create(model="paper", input=["fine", ""])
    assert empty.value.param == "input[1]" and "must not be empty" in empty.value.message  # type: ignore[attr-defined]
    assert empty.value.body["status"] == "INVALID_ARGUMENT"  # type: ignore[index]
    stranger = openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as denied:
        stranger.moderations.create(input="x")
    assert denied.value.code == "invalid_api_key"  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as too_many:
        client.moderations.create(input=["x"] * 9)  # more than max_batch_items
    assert too_many.value.param == "input"  # type: ignore[attr-defined]


# -------------------------------------------------------- Mistral's chat route


def chat(served: InProcessServer, body: Any) -> tuple[int, Any]:
    url = f"http://127.0.0.1:{served.settings.http_port}/v1/chat/moderations"
    status, _, raw = http_call(url, body, headers={"Authorization": f"Bearer {TOKEN}"})
    return status, json.loads(raw)


CONVERSATION = [
    {"role": "user", "content": "How do I pick a lock?"},
    {"role": "assistant", "content": "First, get a tension wrench."},
]


def test_mistral_chat_moderation_of_one_conversation_and_of_several(
    served: InProcessServer, stub: Any
) -> None:
    def grpc_view(messages: list[dict[str, str]], policy: str = "") -> Any:
        chat_messages = [pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages]
        return expected(stub, pb.ClassifyRequest(messages=chat_messages, policy=policy))

    status, answer = chat(served, {"model": "mistral-13", "input": CONVERSATION})
    assert status == 200 and answer["model"].startswith("demo") and answer["id"]
    (result,) = answer["results"]
    flagged, categories, scores = grpc_view(CONVERSATION, "mistral-13")
    assert result["categories"] == categories and result["flagged"] == flagged
    assert result["category_scores"] == pytest.approx(scores, abs=1e-6)

    conversations = [CONVERSATION, CONVERSATION[:1], [{"role": "user", "content": "hi"}]]
    status, answer = chat(served, {"model": "gpt-4o", "input": conversations})
    assert status == 404 and answer["error"]["param"] == "model"  # not a name of this server
    status, answer = chat(served, {"input": conversations})  # Mistral's categories
    assert status == 200 and len(answer["results"]) == 3 and answer["policy"] == "mistral"
    for conversation, result in zip(conversations, answer["results"], strict=True):
        _, categories, scores = grpc_view(conversation, "mistral")
        assert result["categories"] == categories
        assert result["category_scores"] == pytest.approx(scores, abs=1e-6)
    # Mistral's text chunks are the same text.
    chunked = [
        {"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}
    ]
    status, answer = chat(served, {"input": chunked, "model": "paper"})
    assert status == 200
    assert answer["results"][0]["category_scores"] == pytest.approx(
        grpc_view([{"role": "user", "content": "hi"}])[2], abs=1e-6
    )


def test_mistral_chat_moderation_errors_name_the_input(served: InProcessServer) -> None:
    bad_role = [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]
    status, answer = chat(served, {"input": bad_role})
    assert (status, answer["error"]["param"]) == (400, "input[1].role")
    assert answer["error"]["status"] == "INVALID_ARGUMENT"
    status, answer = chat(served, {"input": [CONVERSATION, bad_role]})
    assert (status, answer["error"]["param"]) == (400, "input[1][1].role")
    status, answer = chat(served, {"model": "paper"})
    assert (status, answer["error"]["param"]) == (400, "input")
    status, answer = chat(served, {"input": CONVERSATION, "temperature": 1})
    assert (status, answer["error"]["param"]) == (400, "temperature")
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]
    status, answer = chat(served, {"input": image})
    assert (status, answer["error"]["param"]) == (400, "input[0].content[0]")
