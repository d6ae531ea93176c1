"""A migration from OpenAI's or Mistral's moderation API, tried with their official SDKs against
a real server (demo checkpoint, real engine): the typed category fields are filled, their model
names are accepted, `--served-model-name`, `GET /v1/models`, `GET /health` and the `Server`
header."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from mistralai.client import Mistral

from moderation.runtime import Runtime
from moderation.serving.http.names import clean_id, vendor_policy
from moderation.serving.settings import ServeSettings, SettingsError, settings_from_env
from moderation.v1 import moderation_pb2 as pb
from tests.servers import (
    InProcessServer,
    demo_loader,
    demo_server,
    free_port,
    http_call,
    wait_listening,
)

TOKEN = "dropin-token"
GRPC_AUTH = (("authorization", f"Bearer {TOKEN}"),)
PAPER = ("illegal_activities", "hateful_harassing_violent", "unqualified_advice")
# OpenAI's Python names of its 13 categories (the SDK's typed fields) and their API names.
OPENAI_FIELDS = {
    "harassment": "harassment",
    "harassment_threatening": "harassment/threatening",
    "hate": "hate",
    "hate_threatening": "hate/threatening",
    "illicit": "illicit",
    "illicit_violent": "illicit/violent",
    "self_harm": "self-harm",
    "self_harm_intent": "self-harm/intent",
    "self_harm_instructions": "self-harm/instructions",
    "sexual": "sexual",
    "sexual_minors": "sexual/minors",
    "violence": "violence",
    "violence_graphic": "violence/graphic",
}
MISTRAL_CATEGORIES = {"sexual", "hate_and_discrimination", "violence_and_threats",
                      "dangerous_and_criminal_content", "selfharm", "health", "financial", "law",
                      "pii"}  # fmt: skip
SERVED = ("mistral-7b-guarded", "guarded", "mistralai/Mistral-7B-Instruct-v0.1")


@pytest.fixture(scope="module")
def served(demo_checkpoint: Path) -> Iterator[InProcessServer]:
    with demo_server(
        demo_checkpoint,
        http_port=free_port(),
        auth_token=TOKEN,
        max_batch_items=8,
        served_model_name=SERVED,
    ) as server:
        yield server


def base_url(served: InProcessServer) -> str:
    return f"http://127.0.0.1:{served.settings.http_port}"


@pytest.fixture(scope="module")
def client(served: InProcessServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url(served) + "/v1", api_key=TOKEN, max_retries=0)


def grpc_view(stub: Any, request: pb.ClassifyRequest) -> pb.ClassifyResponse:
    return stub.Classify(request, metadata=GRPC_AUTH)


# ------------------------------------------------------------------ OpenAI's SDK


@pytest.mark.parametrize("model", [None, "omni-moderation-latest", "omni-moderation-2024-09-26",
                                   "text-moderation-latest", "text-moderation-stable", "openai",
                                   "guarded"])  # fmt: skip
def test_openais_typed_fields_are_filled(
    client: openai.OpenAI, stub: Any, model: str | None
) -> None:
    kwargs = {"model": model} if model else {}
    text = "How do I pick a lock?"
    answer = client.moderations.create(input=[text, "hello"], **kwargs)  # type: ignore[arg-type]
    assert answer.model == SERVED[0]  # the first served name, whatever name asked
    assert answer.model_extra == {"policy": "openai"}
    expected = grpc_view(stub, pb.ClassifyRequest(text=text, policy="openai"))
    result = answer.results[0]
    for field, name in OPENAI_FIELDS.items():
        flag, score = getattr(result.categories, field), getattr(result.category_scores, field)
        assert isinstance(flag, bool) and isinstance(score, float), field
        assert flag == expected.categories[name]
        assert score == pytest.approx(expected.scores[name], abs=1e-6)
        assert getattr(result.category_applied_input_types, field) == ["text"]
    assert result.flagged == expected.flagged
    # the paper's three stay as extra fields; one distribution over the 13 and acceptable
    assert set(PAPER) <= set(result.categories.model_extra or {})
    total = sum(getattr(result.category_scores, f) for f in OPENAI_FIELDS)
    assert total == pytest.approx(1.0 - expected.scores["acceptable"], abs=1e-5)
    # a category flags with `flagged`: the one most probable
    if result.flagged:
        top = max(OPENAI_FIELDS, key=lambda f: getattr(result.category_scores, f))
        assert getattr(result.categories, top) is True


def test_a_policy_name_still_selects_that_policy_and_other_names_are_404(
    client: openai.OpenAI,
) -> None:
    answer = client.moderations.create(model="mistral-13", input="x")
    assert answer.results[0].categories.violence is None  # not a field of mistral-13
    assert "fraud" in (answer.results[0].categories.model_extra or {})
    for unknown in ("gpt-4o", "omni-moderation-", "mistral-moderation-x"):
        with pytest.raises(openai.NotFoundError) as err:
            client.moderations.create(model=unknown, input="x")
        assert err.value.code == "model_not_found"  # type: ignore[attr-defined]
        assert "guarded" in err.value.message  # the served names are listed


# ----------------------------------------------------------------- Mistral's SDK


@pytest.fixture(scope="module")
def mistral(served: InProcessServer) -> Mistral:
    return Mistral(api_key=TOKEN, server_url=base_url(served))


def test_mistrals_sdk_moderates_raw_text_and_conversations(mistral: Mistral, stub: Any) -> None:
    text = "How do I pick a lock?"
    for model in ("mistral-moderation-latest", "mistral-moderation-2411"):
        answer = mistral.classifiers.moderate(model=model, inputs=[text])
        assert answer.model == SERVED[0]
        (result,) = answer.results
        expected = grpc_view(stub, pb.ClassifyRequest(text=text, policy="mistral"))
        assert result.categories is not None and result.category_scores is not None
        assert set(result.categories) == MISTRAL_CATEGORIES | set(PAPER)
        for name in MISTRAL_CATEGORIES:
            assert result.categories[name] == expected.categories[name]
            assert result.category_scores[name] == pytest.approx(expected.scores[name], abs=1e-6)
    conversation = [
        {"role": "user", "content": "How do I pick a lock?"},
        {"role": "assistant", "content": "First, get a tension wrench."},
    ]
    answer = mistral.classifiers.moderate_chat(
        model="mistral-moderation-latest",
        inputs=conversation,  # type: ignore[arg-type]
    )
    messages = [pb.ChatMessage(role=m["role"], content=m["content"]) for m in conversation]
    expected = grpc_view(stub, pb.ClassifyRequest(messages=messages, policy="mistral"))
    (result,) = answer.results
    assert result.category_scores is not None
    assert result.category_scores["violence_and_threats"] == pytest.approx(
        expected.scores["violence_and_threats"], abs=1e-6
    )


def test_the_chat_route_answers_in_the_mistral_policy_by_default(served: InProcessServer) -> None:
    url = base_url(served) + "/v1/chat/moderations"
    body: dict[str, Any] = {"input": [{"role": "user", "content": "hi"}]}
    status, _, raw = http_call(url, body, headers={"Authorization": f"Bearer {TOKEN}"})
    answer = json.loads(raw)
    assert status == 200 and answer["policy"] == "mistral" and answer["model"] == SERVED[0]
    assert set(answer["results"][0]["categories"]) == MISTRAL_CATEGORIES | set(PAPER)
    # an OpenAI name on Mistral's route: OpenAI's categories
    body["model"] = "omni-moderation-latest"
    status, _, raw = http_call(url, body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert json.loads(raw)["policy"] == "openai"


# ------------------------------------------------------- names, models, health


def test_models_lists_the_served_names_then_the_moderation_names(client: openai.OpenAI) -> None:
    models = client.models.list().data
    ids = [m.id for m in models]
    assert ids[:3] == list(SERVED)
    assert all(m.object == "model" and m.owned_by == "mistral-moderation" for m in models)
    assert (models[0].model_extra or {})["max_model_len"] == 8192  # --max-context's default
    assert (models[1].model_extra or {})["root"] == SERVED[0]
    policies = {m.id: (m.model_extra or {}).get("moderation_policy") for m in models[3:]}
    assert policies["omni-moderation-latest"] == "openai"
    assert policies["mistral-moderation-latest"] == "mistral"
    assert {"paper", "mistral-13", "openai", "mistral", "mlcommons"} <= set(policies)
    stranger = openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()


def test_health_needs_no_token_and_says_nothing_else(served: InProcessServer) -> None:
    status, headers, raw = http_call(base_url(served) + "/health")
    assert (status, raw) == (200, b"")
    assert headers["server"] == "mistral-moderation"  # no aiohttp or Python version
    status, headers, _ = http_call(base_url(served) + "/v1/models")
    assert status == 401 and headers["server"] == "mistral-moderation"
    # aiohttp's own answer to a request it cannot parse, which no route sees
    with socket.create_connection(("127.0.0.1", served.settings.http_port), timeout=10) as sock:
        sock.sendall(b"GARBAGE\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head = answer.split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.0 400") and b"server: mistral-moderation" in head
    assert b"aiohttp" not in answer.lower() and b"python" not in answer.lower()


def test_health_is_503_while_loading_and_draining(demo_checkpoint: Path) -> None:
    release = threading.Event()
    load = demo_loader(demo_checkpoint)

    def slow_load(settings: ServeSettings) -> Runtime:
        release.wait(60)
        return load(settings)

    settings = ServeSettings(model_process=False, host="127.0.0.1", port=free_port(),
                             metrics_port=0, http_port=free_port(), auth_token="t")  # fmt: skip
    server = InProcessServer(settings, slow_load)
    url = f"http://127.0.0.1:{settings.http_port}/health"
    try:
        wait_listening(settings.http_port)
        status, _, raw = http_call(url)
        assert (status, raw) == (503, b"")
        release.set()
        server.wait_loaded()
        assert http_call(url)[0] == 200
        server.server.state.draining = True  # what stop() sets first
        assert http_call(url)[0] == 503
    finally:
        release.set()
        server.stop()


def test_without_the_flag_the_served_name_is_the_checkpoints_clean_id(
    demo_checkpoint: Path,
) -> None:
    assert clean_id("demo-tiny-random-mistral (random weights: decisions are meaningless)") == (
        "demo-tiny-random-mistral"
    )
    assert clean_id("My Model v2") == "My-Model-v2"
    with demo_server(demo_checkpoint, http_port=free_port()) as server:
        client = openai.OpenAI(base_url=base_url(server) + "/v1", api_key="x", max_retries=0)
        assert client.models.list().data[0].id == "demo-tiny-random-mistral"
        assert client.moderations.create(input="x").model == "demo-tiny-random-mistral"


def test_vendor_model_names() -> None:
    assert vendor_policy("omni-moderation-latest") == "openai"
    assert vendor_policy("omni-moderation-2024-09-26") == "openai"
    assert vendor_policy("text-moderation-007") == "openai"
    assert vendor_policy("mistral-moderation-2411") == "mistral"
    assert vendor_policy("mistral-moderation-latest") == "mistral"
    for other in ("omni-moderation", "mistral-large-latest", "text-moderation-", "gpt-4o"):
        assert vendor_policy(other) is None


def test_the_served_model_name_setting() -> None:
    settings = settings_from_env({"MODERATION_SERVED_MODEL_NAME": "a, b/c:1"})
    assert settings.served_model_name == ("a", "b/c:1")
    for bad in ("has space", "-dash-first", "x" * 300):
        with pytest.raises(SettingsError, match="--served-model-name / MODERATION_SERVED_MODEL"):
            settings_from_env({"MODERATION_SERVED_MODEL_NAME": bad})


def test_one_model_is_retrieved_by_its_id(client: openai.OpenAI) -> None:
    assert client.models.retrieve(SERVED[2]).id == SERVED[2]  # an id with a "/"
    entry = client.models.retrieve("mistral-moderation-latest")
    assert (entry.model_extra or {})["moderation_policy"] == "mistral"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4o")
    assert err.value.code == "model_not_found"  # type: ignore[attr-defined]
