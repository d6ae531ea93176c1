"""`POST /v1/chat/completions` on guarded generation, end to end: the official `openai` SDK
(plain and streaming) and a raw HTTP client reading the server-sent events as `curl -N` does,
against a real server (demo checkpoint, real engine), answers compared with gRPC's Generate."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import structlog
from mistralai.client import Mistral

from moderation.serving.http.chat import StopScanner, cut_at_stop, read_request
from moderation.serving.http.status import CallError
from moderation.serving.logs import configure_logging
from moderation.v1 import moderation_pb2 as pb
from tests.servers import InProcessServer, demo_server, free_port

TOKEN = "chat-token"
GRPC_AUTH = (("authorization", f"Bearer {TOKEN}"),)
MODEL = "guarded-mistral"
HELLO: Any = [{"role": "user", "content": "Tell me a story"}]


@pytest.fixture(scope="module")
def served(demo_checkpoint: Path) -> Iterator[InProcessServer]:
    with demo_server(
        demo_checkpoint,
        http_port=free_port(),
        auth_token=TOKEN,
        served_model_name=(MODEL,),
    ) as server:
        yield server


@pytest.fixture(scope="module")
def client(served: InProcessServer) -> openai.OpenAI:
    base_url = f"http://127.0.0.1:{served.settings.http_port}/v1"
    return openai.OpenAI(base_url=base_url, api_key=TOKEN, max_retries=0)


def sse(
    served: InProcessServer, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], list[str]]:
    """A streamed request read as `curl -N` reads it: the `data:` lines as they come."""
    conn = http.client.HTTPConnection("127.0.0.1", served.settings.http_port, timeout=60)
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps(body),
        {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json", **(headers or {})},
    )
    response = conn.getresponse()
    got = {k.lower(): v for k, v in response.getheaders()}
    events, blank = [], True
    while line := response.readline():
        text = line.decode().rstrip("\n")
        if text:
            assert blank, "an event is one data line and a blank line"
            events.append(text)
        blank = not text
    conn.close()
    return response.status, got, events


# --------------------------------------------------------------- the OpenAI SDK


def test_a_completion_is_generates_answer_in_openais_shape(client: Any, stub: Any) -> None:
    answer = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12)
    grpc_answer = stub.Generate(
        pb.GenerateRequest(messages=[pb.ChatMessage(**HELLO[0])], max_new_tokens=12),
        metadata=GRPC_AUTH,
    )
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    assert answer.model == MODEL
    (choice,) = answer.choices
    assert choice.message.role == "assistant" and choice.message.content == grpc_answer.text
    assert choice.finish_reason == ("length" if grpc_answer.completion_tokens == 12 else "stop")
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == grpc_answer.prompt_tokens  # guardrail prompt included
    assert answer.usage.completion_tokens == grpc_answer.completion_tokens
    assert answer.usage.total_tokens == grpc_answer.prompt_tokens + grpc_answer.completion_tokens
    assert answer.moderation is None  # none was asked for
    # safe_prompt false (Mistral's name): no guardrail system prompt, a shorter prompt
    bare = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=1,
        extra_body={"safe_prompt": False},
    )
    assert bare.usage is not None and bare.usage.prompt_tokens < answer.usage.prompt_tokens


def test_with_a_seed_the_streamed_text_is_the_plain_text(client: Any) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "messages": HELLO, "max_completion_tokens": 16,
                              "temperature": 0.9, "top_p": 0.95, "seed": 1234}  # fmt: skip
    plain = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content and text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == plain.id.replace(plain.id, c.id) and c.model == MODEL for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    last = chunks[-1]
    assert last.choices[0].finish_reason == plain.choices[0].finish_reason
    assert last.moderation is None
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    other = client.chat.completions.create(**{**kwargs, "seed": 99})
    assert other.choices[0].message.content != text  # the seed is what made them equal


def test_usage_in_a_stream_comes_last_when_asked(client: Any) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=5, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])


def test_openais_moderation_parameter_blocks_a_flagged_input(client: Any) -> None:
    # threshold 0: every text is flagged, so the refusal path runs on random weights
    moderation: Any = {"model": "omni-moderation-latest", "policy": {"input": {"mode": "block"}}}
    kwargs: dict[str, Any] = {"model": MODEL, "messages": HELLO, "moderation": moderation,
                              "extra_body": {"threshold": 0.0}}  # fmt: skip
    answer = client.chat.completions.create(**kwargs)
    (choice,) = answer.choices
    assert choice.finish_reason == "content_filter"
    assert choice.message.content is None and choice.message.refusal
    assert answer.moderation is not None
    results = answer.moderation.input
    assert results.type == "moderation_results" and results.model == "omni-moderation-latest"
    (result,) = results.results
    assert result.flagged is True and result.type == "moderation_result"
    assert isinstance(result.categories["violence"], bool)  # OpenAI's category names
    assert set(result.category_scores) == set(result.categories)
    assert result.category_applied_input_types["self-harm/intent"] == ["text"]
    assert (answer.moderation.model_extra or {}) == {} and answer.moderation.output is None
    assert answer.usage is not None and answer.usage.completion_tokens == 0
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert [c.choices[0].delta.content for c in chunks] == ["", None]
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert chunks[-1].choices[0].delta.refusal == choice.message.refusal
    assert chunks[-1].moderation is not None
    assert chunks[-1].moderation.input.results[0].flagged is True


def test_moderation_in_score_mode_reports_without_blocking(client: Any, stub: Any) -> None:
    moderation: Any = {"model": "mlcommons"}  # a policy name picks that policy
    for stream in (False, True):
        kwargs: dict[str, Any] = {"model": MODEL, "messages": HELLO, "max_tokens": 6,
                                  "moderation": moderation, "seed": 5, "temperature": 0.5,
                                  "extra_body": {"threshold": 0.0}}  # fmt: skip
        if stream:
            chunks = list(client.chat.completions.create(**kwargs, stream=True))
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish, report = chunks[-1].choices[0].finish_reason, chunks[-1].moderation
        else:
            answer = client.chat.completions.create(**kwargs)
            text = answer.choices[0].message.content or ""
            finish, report = answer.choices[0].finish_reason, answer.moderation
        assert finish != "content_filter" and text  # flagged, yet not blocked
        assert report is not None and report.input.model == "mlcommons"
        messages = [pb.ChatMessage(**HELLO[0])]
        expected_in = stub.Classify(
            pb.ClassifyRequest(messages=messages, policy="mlcommons", threshold=0.0),
            metadata=GRPC_AUTH,
        )
        got_in = report.input.results[0]
        assert got_in.flagged is True
        assert got_in.category_scores["s1_violent_crimes"] == pytest.approx(
            expected_in.scores["s1_violent_crimes"], abs=1e-6
        )
        answer_message = pb.ChatMessage(role="assistant", content=text)
        expected_out = stub.Classify(
            pb.ClassifyRequest(messages=[*messages, answer_message], policy="mlcommons",
                               threshold=0.0),
            metadata=GRPC_AUTH,
        )  # fmt: skip
        got_out = report.output.results[0]
        assert got_out.category_scores["s10_hate"] == pytest.approx(
            expected_out.scores["s10_hate"], abs=1e-6
        )


def test_a_stream_stopped_by_output_moderation_ends_with_content_filter(
    client: Any,
) -> None:
    extra = {"moderate_output": True, "threshold": 0.0, "stream_check_tokens": 2}
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=20,
            extra_body=extra,
            stream=True,
        )
    )
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    report = chunks[-1].moderation
    assert report is not None and report.input is None
    assert report.output.results[0].flagged is True
    # the first check flagged: nothing of the answer was released
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    plain = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=20,
        extra_body=extra,
    )
    assert plain.choices[0].finish_reason == "content_filter"
    assert plain.choices[0].message.content is None


def test_stop_sequences_cut_the_answer_plain_and_streamed(client: Any, stub: Any) -> None:
    full = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=24)
    text = full.choices[0].message.content or ""
    assert len(text) > 6
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    expected = text[: text.find(stop)]
    for stops in (stop, [stop, "\x00never"]):
        answer = client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=24,
            stop=stops,
        )
        assert answer.choices[0].message.content == expected
        assert answer.choices[0].finish_reason == "stop"
        assert answer.usage == full.usage  # generation ran to its end
        chunks = list(
            client.chat.completions.create(
                model=MODEL,
                messages=HELLO,
                max_tokens=24,
                stop=stops,
                stream=True,
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == "stop"
    # A scored output is the text returned, not what was generated past the stop sequence.
    scored = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=24, stop=stop, moderation={"model": "openai"}
    )
    assert expected.strip()  # greedy on the demo checkpoint: the same text every run
    messages = [pb.ChatMessage(**HELLO[0]), pb.ChatMessage(role="assistant", content=expected)]
    grpc_answer = stub.Classify(
        pb.ClassifyRequest(messages=messages, policy="openai"), metadata=GRPC_AUTH
    )
    assert scored.moderation.output.results[0].category_scores["hate"] == pytest.approx(
        grpc_answer.scores["hate"], abs=1e-6
    )


def test_errors_name_the_request_field(client: Any, served: InProcessServer) -> None:
    def refused(exc: type[openai.APIStatusError], **kwargs: Any) -> Any:
        body = {"model": MODEL, "messages": HELLO, **kwargs}
        with pytest.raises(exc) as err:
            client.chat.completions.create(**body)
        with pytest.raises(exc):  # the same before a stream starts: an ordinary error
            client.chat.completions.create(**body, stream=True)
        return err.value

    e = refused(openai.NotFoundError, model="gpt-4o")
    assert e.code == "model_not_found" and MODEL in e.message
    assert refused(openai.NotFoundError, model="omni-moderation-latest").param == "model"
    e = refused(openai.BadRequestError, messages=[{"role": "robot", "content": "x"}])
    assert e.param == "messages[0].role"
    e = refused(openai.BadRequestError, messages=[{"role": "assistant", "content": "x"}])
    assert e.param == "messages[0].role" and e.body["status"] == "INVALID_ARGUMENT"
    assert refused(openai.BadRequestError, max_tokens=10**6).param == "max_tokens"
    assert refused(openai.BadRequestError, max_completion_tokens=10**6).param == (
        "max_completion_tokens"
    )
    assert refused(openai.BadRequestError, temperature=-1).param == "temperature"
    assert refused(openai.BadRequestError, n=2).param == "n"
    tool = {"type": "function", "function": {"name": "f"}}
    assert refused(openai.BadRequestError, tools=[tool]).param == "tools"
    assert refused(openai.BadRequestError, extra_body={"nope": 1}).param == "nope"
    assert refused(openai.BadRequestError, extra_body={"stream_check_tokens": 5000}).param == (
        "stream_check_tokens"
    )
    assert refused(openai.BadRequestError, extra_body={"policy": "nope"}).param == "policy"
    e = refused(openai.NotFoundError, moderation={"model": "gpt-4o"})
    assert e.param == "moderation.model"
    bad_mode = {"model": "openai", "policy": {"input": {"mode": "maybe"}}}
    assert refused(openai.BadRequestError, moderation=bad_mode).param == ("moderation.policy.input")
    # neutral values of unsupported features are accepted, as clients send their defaults
    answer = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=1, n=1, tools=[], presence_penalty=0,
        logprobs=False, user="someone", response_format={"type": "text"},
    )  # fmt: skip
    assert answer.choices[0].message.role == "assistant"
    stranger = openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.chat.completions.create(model=MODEL, messages=HELLO)


# ------------------------------------------------------ raw server-sent events


def test_the_stream_is_server_sent_events_as_curl_n_reads_them(
    served: InProcessServer, client: Any
) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 10, "stream": True}
    status, headers, events = sse(served, body, {"x-request-id": "sse-1"})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert headers["x-request-id"] == "sse-1" and headers["server"] == "mistral-moderation"
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["id"] for c in chunks} == {"chatcmpl-sse-1"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    plain = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10)
    assert text == plain.choices[0].message.content
    # an error before the first event is an ordinary error answer, not a stream
    status, headers, events = sse(served, body, {"grpc-timeout": "1n"})
    assert status == 504 and headers["content-type"].startswith("application/json")
    assert json.loads(events[0])["error"]["status"] == "DEADLINE_EXCEEDED"


def test_an_error_after_the_first_chunk_is_an_error_event_then_done(
    demo_checkpoint: Path,
) -> None:
    # Scoring the answer (moderation in score mode) runs after the text was streamed: an answer
    # longer than the server's text limit fails it there.
    with demo_server(demo_checkpoint, http_port=free_port(), max_text_chars=10,
                     served_model_name=(MODEL,)) as server:  # fmt: skip
        body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                "stream": True, "max_tokens": 30,
                                "moderation": {"model": "openai"}}  # fmt: skip
        status, _, events = sse(server, body)
        assert status == 200 and events[-1] == "data: [DONE]"
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
        error = chunks[-1]["error"]
        assert error["status"] == "INVALID_ARGUMENT" and "10" in error["message"]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.settings.http_port}/v1",
                               api_key="x", max_retries=0)  # fmt: skip
        with pytest.raises(openai.APIError, match="characters exceed"):
            list(client.chat.completions.create(**body))


def test_a_client_that_hangs_up_mid_stream_cancels_the_generation(
    served: InProcessServer, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("info")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", served.settings.http_port, timeout=60)
        body = {"model": MODEL, "messages": HELLO, "max_tokens": 500, "stream": True}
        headers = {"Authorization": f"Bearer {TOKEN}", "x-request-id": "chat-hang-up"}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
        response = conn.getresponse()
        assert response.readline().startswith(b"data: ")  # the stream is under way
        conn.sock.close()  # type: ignore[union-attr]  # as a client that goes away
        conn.close()
        err = ""
        for _ in range(1000):  # until the request's line is written (as its handler returns)
            err += capsys.readouterr().err
            if '"chat-hang-up"' in err and not served.server.in_flight:
                break
            threading.Event().wait(0.01)
    finally:
        structlog.reset_defaults()
    lines = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    (line,) = [x for x in lines if x.get("request_id") == "chat-hang-up"]
    assert (line["code"], line["status"], line["method"]) == ("CANCELLED", 499, "GenerateStream")
    assert "completion_tokens" not in line  # it never finished: the model let it go


def test_chat_requests_are_logged_and_counted_as_the_other_routes(
    served: InProcessServer, client: Any
) -> None:
    registry = served.server.metrics.registry
    labels = {"http_request_method": "POST", "http_route": "/v1/chat/completions",
              "http_response_status_code": "200"}  # fmt: skip

    def count() -> float:
        return registry.get_sample_value("http_server_request_duration_seconds_count", labels) or 0

    def tokens() -> float:
        value = registry.get_sample_value("moderation_tokens_total", {"kind": "completion"})
        return value or 0.0

    before, generated = count(), tokens()
    client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
    list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, stream=True))
    # The request's line and count are written as its handler returns, which may be just after
    # the client has read the stream's end.
    for _ in range(1000):
        if count() == before + 2:
            break
        threading.Event().wait(0.01)
    assert count() == before + 2 and tokens() == generated + 6
    ttft = registry.get_sample_value("moderation_time_to_first_token_seconds_count")
    assert ttft and ttft > 0


def test_mistrals_sdk_chats_with_the_guarded_model(served: InProcessServer) -> None:
    mistral = Mistral(api_key=TOKEN, server_url=f"http://127.0.0.1:{served.settings.http_port}")
    answer = mistral.chat.complete(model=MODEL, messages=HELLO, max_tokens=6, random_seed=1)
    assert answer.choices and answer.choices[0].message
    assert answer.choices[0].message.content
    streamed = "".join(
        event.data.choices[0].delta.content or ""  # type: ignore[operator]
        for event in mistral.chat.stream(model=MODEL, messages=HELLO, max_tokens=6, random_seed=1)
        if event.data.choices
    )
    assert streamed == answer.choices[0].message.content  # type: ignore[union-attr]


# ------------------------------------------------------------------ the parts


def test_the_request_is_read_into_a_generate_request() -> None:
    chat = read_request(
        {"model": "m", "messages": [{"role": "developer", "content": "Be brief."},
                                    {"role": "user", "content": [{"type": "text", "text": "hi"}],
                                     "name": "ann", "tool_calls": None}],
         "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "random_seed": 3, "stop": "x",
         "moderate_output": True, "stream_check_tokens": 4, "safe_prompt": True}
    )  # fmt: skip
    g = chat.generation
    assert [(m.role, m.content) for m in g.messages] == [("system", "Be brief."), ("user", "hi")]
    assert (g.max_new_tokens, g.seed, g.moderate_output, g.stream_check_tokens) == (7, 3, True, 4)
    assert g.temperature == pytest.approx(0.5) and not g.disable_guardrail
    assert chat.stop == ("x",) and not chat.stream
    for body, field in (
        ({"messages": HELLO}, "model"),
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": HELLO, "stop": ["a"] * 5}, "stop"),
        ({"model": "m", "messages": HELLO, "stream": "yes"}, "stream"),
        ({"model": "m", "messages": HELLO, "seed": True}, "seed"),
        ({"model": "m", "messages": HELLO, "stream_options": {"include_usage": True}},
         "stream_options"),
        ({"model": "m", "messages": [{"role": "user", "content": "x", "audio": {"id": 1}}]},
         "messages[0].audio"),
    ):  # fmt: skip
        with pytest.raises(CallError) as err:
            read_request(body)
        assert err.value.field == field


def test_stop_sequences_are_cut_however_the_text_is_split() -> None:
    assert cut_at_stop("one two three", ["two", "one t"]) == ("", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)
    text, stops = "Hello world. The end.", ["world.", "The"]
    for size in (1, 2, 3, 5, 100):
        scanner = StopScanner(stops)
        pieces = [scanner.push(text[i : i + size]) for i in range(0, len(text), size)]
        assert "".join(pieces) + scanner.flush() == "Hello "
        assert scanner.stopped
    scanner = StopScanner(["ab"])
    assert (scanner.push("xa"), scanner.push("c"), scanner.flush()) == ("x", "ac", "")
    assert (scanner.push("a"), scanner.flush()) == ("", "a")  # held back, then let out
