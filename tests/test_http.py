"""The HTTP/JSON listener end to end: a real server (gRPC and HTTP ports, one servicer, the real
engine on the demo checkpoint), plain HTTP clients (urllib), answers compared with gRPC's."""

from __future__ import annotations

import json
import ssl
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from google.protobuf import json_format

from moderation.runtime import Runtime
from moderation.serving.logs import configure_logging
from moderation.serving.settings import ServeSettings, SettingsError, settings_from_env
from moderation.v1 import moderation_pb2 as pb
from moderation.v1 import moderation_pb2_grpc as pb_grpc
from tests.certs import NoCertificateTool, make_certificates
from tests.servers import (
    InProcessServer,
    demo_loader,
    demo_server,
    free_port,
    http_call,
    wait_listening,
)

TOKEN = "http-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BYTES = 64 * 1024
PAPER = ("illegal_activities", "hateful_harassing_violent", "unqualified_advice")


@pytest.fixture(scope="module")
def served(demo_checkpoint: Path):  # type: ignore[no-untyped-def]
    with demo_server(
        demo_checkpoint,
        http_port=free_port(),
        auth_token=TOKEN,
        max_batch_items=8,
        max_text_chars=2000,
        max_message_bytes=MAX_BYTES,
    ) as server:
        yield server


GRPC_AUTH = (("authorization", f"Bearer {TOKEN}"),)


def call(
    served: InProcessServer,
    path: str,
    body: Any = None,
    *,
    method: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    url = f"http://127.0.0.1:{served.settings.http_port}{path}"
    status, got, raw = http_call(url, body, method=method, headers={**AUTH, **(headers or {})})
    if got.get("content-type", "").startswith("application/json"):
        return status, got, json.loads(raw)
    return status, got, raw


def error(answer: Any) -> dict[str, Any]:
    assert set(answer) == {"error"}, answer
    return answer["error"]  # type: ignore[no-any-return]


# ------------------------------------------------------------- transcoded RPCs


def test_classify_is_the_json_form_of_the_grpc_answer(served: InProcessServer, stub: Any) -> None:
    request = {"text": "hello there", "policy": "mistral-13", "categoryThresholds": {"fraud": 0.1}}
    status, headers, answer = call(served, "/v1/classify", request)
    assert status == 200 and headers["content-type"].startswith("application/json")
    expected = stub.Classify(
        json_format.ParseDict(request, pb.ClassifyRequest()), metadata=GRPC_AUTH
    )
    assert answer["category"] == expected.category and answer["flagged"] == expected.flagged
    assert answer["scores"] == pytest.approx(dict(expected.scores), abs=1e-6)
    assert answer["categories"] == dict(expected.categories)
    # proto3 JSON: lowerCamelCase names, defaults printed, 64-bit-free numbers as numbers
    assert answer["promptTokens"] == expected.prompt_tokens > 0 and answer["windows"] == 1
    assert answer["contextTokens"] == 0 and answer["paperCategory"] == expected.paper_category
    # the proto field names are accepted too
    status, _, same = call(
        served,
        "/v1/classify",
        {"text": "hello there", "policy": "mistral-13", "category_thresholds": {"fraud": 0.1}},
    )
    assert status == 200 and same["scores"] == answer["scores"]


def test_batch_generate_stream_and_model_info(served: InProcessServer, stub: Any) -> None:
    texts = ["first text", "second text", "third text"]
    status, _, batch = call(
        served, "/v1/classify/batch", {"requests": [{"text": t} for t in texts]}
    )
    assert status == 200 and len(batch["results"]) == 3
    for text, got in zip(texts, batch["results"], strict=True):
        alone = stub.Classify(pb.ClassifyRequest(text=text), metadata=GRPC_AUTH)
        assert got["scores"] == pytest.approx(dict(alone.scores), abs=1e-5)

    request = {"messages": [{"role": "user", "content": "Tell me a story"}], "maxNewTokens": 8}
    status, _, unary = call(served, "/v1/generate", request)
    assert status == 200 and 1 <= unary["completionTokens"] <= 8
    assert unary["finishReason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH")
    grpc_answer = stub.Generate(
        json_format.ParseDict(request, pb.GenerateRequest()), metadata=GRPC_AUTH
    )
    assert unary["text"] == grpc_answer.text  # greedy: the same answer

    status, headers, raw = call(served, "/v1/generate/stream", request)
    assert status == 200 and headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in raw.decode().splitlines()]
    assert all(set(line) == {"result"} for line in lines)
    events = [line["result"] for line in lines]
    assert all("delta" in e for e in events[:-1]) and "final" in events[-1]
    assert "".join(e["delta"] for e in events[:-1]) == events[-1]["final"]["text"] == unary["text"]

    status, _, info = call(served, "/v1/model")
    assert status == 200 and info["model"] == grpc_answer.model and info["demo"] is True
    assert {p["name"] for p in info["policies"]} >= {"paper", "mistral-13"}
    assert info["maxContextTokens"] > 0 and info["defaultPolicy"] == "paper"


def test_a_stream_that_fails_before_its_first_event_is_an_ordinary_error(
    served: InProcessServer,
) -> None:
    status, _, answer = call(served, "/v1/generate/stream", {"messages": [{"role": "bot"}]})
    assert status == 400
    assert error(answer)["status"] == "INVALID_ARGUMENT"
    assert error(answer)["field"].startswith("messages")


# -------------------------------------------------------------------- errors


def test_errors_are_json_with_status_message_and_field(served: InProcessServer) -> None:
    cases = [
        ({"txt": "typo"}, "txt"),  # unknown field, refused by the JSON parser
        ({"text": "x", "threshold": "high"}, "threshold"),  # wrong JSON type
        ({"text": "x", "role": "ROLE_NOPE"}, "role"),
        ({"text": ""}, "text"),  # refused by the servicer: its BadRequest detail
        ({"text": "x", "threshold": 2}, "threshold"),
        ({"text": "x", "policy": "nope"}, "policy"),
    ]
    for body, field in cases:
        status, _, answer = call(served, "/v1/classify", body)
        e = error(answer)
        assert (status, e["code"], e["status"], e["field"]) == (400, 400, "INVALID_ARGUMENT", field)
        assert e["message"].startswith(field)
    status, _, answer = call(
        served,
        "/v1/classify/batch",
        {"requests": [{"text": "ok"}, {"text": "x", "policy": "nope"}]},
    )
    assert status == 400 and error(answer)["field"] == "requests[1].policy"
    status, _, answer = call(served, "/v1/classify/batch", {"requests": [{"text": "a", "bad": 1}]})
    assert status == 400 and error(answer)["field"] == "requests[0].bad"
    status, _, answer = call(served, "/v1/classify", b"{not json")
    assert status == 400 and error(answer)["status"] == "INVALID_ARGUMENT"
    status, _, answer = call(served, "/v1/model?verbose=1")
    assert status == 400 and error(answer)["field"] == "verbose"


def test_auth_routes_methods_and_body_size(served: InProcessServer) -> None:
    url = f"http://127.0.0.1:{served.settings.http_port}"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        status, got, raw = http_call(f"{url}/v1/classify", {"text": "x"}, headers=headers)
        e = error(json.loads(raw))
        assert (status, e["code"], e["status"]) == (401, 401, "UNAUTHENTICATED")
        assert got["x-request-id"]
    # An unknown path is refused without a token too (no probing for routes), then 404.
    assert http_call(f"{url}/v2/nothing")[0] == 401
    status, _, answer = call(served, "/v2/nothing")
    assert (status, error(answer)["status"]) == (404, "NOT_FOUND")
    status, headers, answer = call(served, "/v1/classify", method="GET")
    assert (status, error(answer)["status"]) == (405, "UNIMPLEMENTED")
    assert "POST" in headers["allow"]
    # A body over MODERATION_MAX_MESSAGE_BYTES: 413, RESOURCE_EXHAUSTED as over gRPC.
    status, _, answer = call(served, "/v1/classify", {"text": "x" * MAX_BYTES})
    e = error(answer)
    assert (status, e["status"]) == (413, "RESOURCE_EXHAUSTED")
    assert str(MAX_BYTES) in e["message"]


def test_request_ids_are_honoured_and_echoed(served: InProcessServer) -> None:
    status, headers, _ = call(
        served, "/v1/classify", {"text": "x"}, headers={"x-request-id": "req-42"}
    )
    assert status == 200 and headers["x-request-id"] == "req-42"
    status, headers, _ = call(
        served, "/v1/classify", {"text": ""}, headers={"x-request-id": "req-43"}
    )
    assert status == 400 and headers["x-request-id"] == "req-43"
    status, headers, _ = call(
        served,
        "/v1/generate/stream",
        {"messages": [{"role": "user", "content": "x"}], "maxNewTokens": 2},
        headers={"x-request-id": "req-44"},
    )
    assert status == 200 and headers["x-request-id"] == "req-44"
    _, first, _ = call(served, "/v1/classify", {"text": "x"})
    _, second, _ = call(served, "/v1/classify", {"text": "x"})
    assert len(first["x-request-id"]) == 32 and first["x-request-id"] != second["x-request-id"]


def test_deadlines_from_the_grpc_timeout_header(served: InProcessServer) -> None:
    status, _, answer = call(served, "/v1/classify", {"text": "x"}, headers={"grpc-timeout": "1n"})
    assert (status, error(answer)["status"]) == (504, "DEADLINE_EXCEEDED")
    status, _, answer = call(
        served, "/v1/classify", {"text": "x"}, headers={"grpc-timeout": "soon"}
    )
    assert (status, error(answer)["field"]) == (400, "grpc-timeout")
    status, _, _ = call(served, "/v1/classify", {"text": "x"}, headers={"grpc-timeout": "60S"})
    assert status == 200


# ------------------------------------------------------------ metrics and logs


def test_http_requests_are_counted_apart_from_grpc_calls(
    served: InProcessServer, stub: Any
) -> None:
    registry = served.server.metrics.registry

    def value(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    grpc_labels = {
        "grpc_type": "unary",
        "grpc_service": "moderation.v1.ModerationService",
        "grpc_method": "Classify",
    }
    http_ok = {
        "http_request_method": "POST",
        "http_route": "/v1/classify",
        "http_response_status_code": "200",
    }
    http_bad = {**http_ok, "http_response_status_code": "400"}

    def decisions() -> float:
        return sum(
            value("moderation_decisions_total", policy="paper", category=c, flagged=f)
            for c in ("acceptable", *PAPER)
            for f in ("true", "false")
        )

    before = (
        value("grpc_server_started_total", **grpc_labels),
        value("http_server_request_duration_seconds_count", **http_ok),
        value("http_server_request_duration_seconds_count", **http_bad),
        decisions(),
    )
    for _ in range(3):
        assert call(served, "/v1/classify", {"text": "x", "threshold": 1.0})[0] == 200
    assert call(served, "/v1/classify", {"text": ""})[0] == 400
    stub.Classify(pb.ClassifyRequest(text="y"), metadata=GRPC_AUTH)
    assert value("grpc_server_started_total", **grpc_labels) == before[0] + 1  # gRPC's own
    assert value("http_server_request_duration_seconds_count", **http_ok) == before[1] + 3
    assert value("http_server_request_duration_seconds_count", **http_bad) == before[2] + 1
    # the model's work is counted whichever port asked for it: 3 over HTTP, 1 over gRPC
    assert decisions() == before[3] + 4
    assert value("http_server_active_requests") == 0


def test_one_log_line_per_request_without_the_text(
    served: InProcessServer, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("info")
    try:
        secret = "my very secret text"
        call(served, "/v1/classify", {"text": secret}, headers={"x-request-id": "log-1"})
        call(served, "/v1/classify", {"text": ""}, headers={"x-request-id": "log-2"})
        call(served, "/v1/nowhere", headers={"x-request-id": "log-3"})
        err = capsys.readouterr().err
    finally:
        structlog.reset_defaults()
    assert secret not in err
    lines = {}
    for text in err.splitlines():
        if text.startswith("{"):
            line = json.loads(text)
            if line.get("transport") == "http":
                lines[line["request_id"]] = line
    ok, bad, lost = lines["log-1"], lines["log-2"], lines["log-3"]
    assert (ok["route"], ok["method"], ok["status"], ok["code"]) == (
        "/v1/classify",
        "Classify",
        200,
        "OK",
    )
    assert ok["latency_ms"] > 0 and ok["prompt_tokens"] > 0 and "category" in ok
    assert (bad["status"], bad["code"], bad["level"]) == (400, "INVALID_ARGUMENT", "info")
    assert bad["error"].startswith("text")
    assert (lost["status"], lost["code"], lost["route"]) == (404, "NOT_FOUND", "/v1/nowhere")


# ------------------------------------------------------ loading, draining, TLS


def test_loading_and_draining_answer_503(demo_checkpoint: Path) -> None:
    release = threading.Event()
    load = demo_loader(demo_checkpoint)

    def slow_load(settings: ServeSettings) -> Runtime:
        release.wait(60)
        return load(settings)

    settings = ServeSettings(
        model_process=False,
        host="127.0.0.1",
        port=free_port(),
        metrics_port=0,
        http_port=free_port(),
    )
    server = InProcessServer(settings, slow_load)
    url = f"http://127.0.0.1:{settings.http_port}/v1/classify"
    try:
        wait_listening(settings.http_port)
        status, _, raw = http_call(url, {"text": "too early"})
        assert (status, error(json.loads(raw))["status"]) == (503, "UNAVAILABLE")
        release.set()
        server.wait_loaded()
        assert http_call(url, {"text": "now"})[0] == 200
        server.server.state.draining = True  # what stop() sets first
        status, _, raw = http_call(url, {"text": "too late"})
        assert (status, error(json.loads(raw))["status"]) == (503, "UNAVAILABLE")
    finally:
        release.set()
        server.stop()


def test_an_http_call_in_flight_completes_during_the_drain(demo_checkpoint: Path) -> None:
    settings = ServeSettings(
        model_process=False,
        host="127.0.0.1",
        port=free_port(),
        metrics_port=0,
        http_port=free_port(),
        grace_period=30,
    )
    server = InProcessServer(settings, demo_loader(demo_checkpoint))
    server.wait_loaded()
    url = f"http://127.0.0.1:{settings.http_port}/v1/generate"
    answers: list[Any] = []
    request = {"messages": [{"role": "user", "content": "a long one"}], "maxNewTokens": 300}
    worker = threading.Thread(target=lambda: answers.append(http_call(url, request)))
    worker.start()
    while server.server.in_flight == 0:  # the call has reached the servicer
        worker.join(0.01)
    server.stop()  # waits for the call, then closes the port
    worker.join(60)
    status, _, raw = answers[0]
    assert status == 200 and json.loads(raw)["completionTokens"] == 300


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    try:
        return make_certificates(tmp_path_factory.mktemp("certs"))
    except NoCertificateTool as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_the_http_port_has_the_grpc_ports_tls(
    demo_checkpoint: Path, certificates: dict[str, Path], mutual: bool
) -> None:
    c = certificates
    settings = ServeSettings(
        model_process=False,
        host="127.0.0.1",
        port=free_port(),
        metrics_port=0,
        http_port=free_port(),
        tls_cert=str(c["srv.pem"]),
        tls_key=str(c["srv.key"]),
        tls_client_ca=str(c["ca.pem"]) if mutual else None,
    )
    server = InProcessServer(settings, demo_loader(demo_checkpoint))
    server.wait_loaded()
    try:
        context = ssl.create_default_context(cafile=str(c["ca.pem"]))
        anonymous = ssl.create_default_context(cafile=str(c["ca.pem"]))
        if mutual:
            context.load_cert_chain(str(c["cli.pem"]), str(c["cli.key"]))
        url = f"https://localhost:{settings.http_port}/v1/classify"
        status, _, raw = http_call(url, {"text": "over tls"}, context=context)
        assert status == 200 and json.loads(raw)["model"]
        with pytest.raises(Exception):  # noqa: B017 - no plaintext on a TLS port
            http_call(
                f"http://127.0.0.1:{settings.http_port}/v1/classify", {"text": "x"}, timeout=5
            )
        if mutual:  # no client certificate: refused in the handshake
            with pytest.raises((ssl.SSLError, OSError)):
                http_call(url, {"text": "x"}, context=anonymous, timeout=5)
    finally:
        server.stop()


def test_the_http_port_setting() -> None:
    assert settings_from_env({}).http_port == 0  # off unless asked for
    assert settings_from_env({"MODERATION_HTTP_PORT": "8080"}).http_port == 8080
    for bad in ("-1", "70000", "http", "50051"):
        with pytest.raises(SettingsError, match="MODERATION_HTTP_PORT"):
            settings_from_env({"MODERATION_HTTP_PORT": bad})


def test_a_client_that_hangs_up_cancels_its_call(
    served: InProcessServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """The request's task is cancelled (aiohttp's handler_cancellation), which takes the
    generation out of the model's batch, as a cancelled gRPC call is: logged CANCELLED, 499."""
    import socket

    configure_logging("info")
    try:
        body = json.dumps({"messages": [{"role": "user", "content": "go on"}],
                           "maxNewTokens": 500}).encode()  # fmt: skip
        head = (f"POST /v1/generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"x-request-id: hang-up\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
        server = served.server
        with socket.create_connection(("127.0.0.1", served.settings.http_port)) as sock:
            sock.sendall(head + body)
            while not (server.in_flight and generating(served)):
                threading.Event().wait(0.01)  # until the generation is in the model's hands
        while server.in_flight:
            threading.Event().wait(0.01)
        err = capsys.readouterr().err
    finally:
        structlog.reset_defaults()
    lines = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    (line,) = [x for x in lines if x.get("request_id") == "hang-up"]
    assert (line["code"], line["status"]) == ("CANCELLED", 499)
    assert "completion_tokens" not in line  # it never finished


def generating(served: InProcessServer) -> bool:
    registry = served.server.metrics.registry
    waiting = registry.get_sample_value("moderation_queue_depth") or 0
    running = registry.get_sample_value("moderation_running_sequences") or 0
    return waiting + running > 0


def test_grpc_codes_map_to_http_as_grpc_gateway_maps_them() -> None:
    import asyncio

    from moderation.serving.http.context import HttpContext
    from moderation.serving.http.status import HTTP_STATUS

    expected = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403,
                "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499, "INTERNAL": 500,
                "UNIMPLEMENTED": 501, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}  # fmt: skip
    assert {
        code.name: HTTP_STATUS[code] for code in HTTP_STATUS if code.name in expected
    } == expected
    assert set(HTTP_STATUS) == set(grpc.StatusCode)
    context = HttpContext()

    async def shed() -> None:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")

    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(shed())
    error = context.error()
    assert (error.status, error.body()["error"]["status"]) == (429, "RESOURCE_EXHAUSTED")


def test_a_stream_that_fails_midway_ends_with_an_error_line() -> None:
    """The listener alone, with a servicer double whose stream fails after its first event (as
    when the model process dies mid-answer): the 200 is sent, so the error is the last line."""
    import asyncio

    import aiohttp

    from moderation.serving.http.server import HttpServer
    from moderation.serving.metrics import Metrics

    class FailingMidway(pb_grpc.ModerationServiceServicer):
        async def GenerateStream(self, request: Any, context: Any) -> Any:  # type: ignore[override]
            yield pb.GenerateStreamResponse(delta="Once upon")
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model process exited")

    async def stream() -> tuple[int, str]:
        settings = ServeSettings(host="127.0.0.1", port=free_port(), http_port=free_port())
        server = HttpServer(settings, FailingMidway(), Metrics.create(), None)
        await server.start()
        try:
            async with aiohttp.ClientSession() as session:
                url = f"http://127.0.0.1:{server.port}/v1/generate/stream"
                body = {"messages": [{"role": "user", "content": "a story"}]}
                async with session.post(url, json=body) as response:
                    return response.status, await response.text()
        finally:
            await server.stop()

    status, text = asyncio.run(stream())
    lines = [json.loads(line) for line in text.splitlines()]
    assert status == 200 and lines[0] == {"result": {"delta": "Once upon"}}
    error = {"code": 503, "status": "UNAVAILABLE", "message": "the model process exited"}
    assert lines[1] == {"error": {**error, "field": None}}
    assert len(lines) == 2
