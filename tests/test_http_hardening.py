"""Issue #19: the HTTP listener held to what the gRPC port holds.

Bodies are decoded on the planning threads, within a nesting limit, a value budget and the count
limits, before anything walks them, under the call's `grpc-timeout`; no caller input reaches a
5xx; echoes are capped; the port's connections follow the gRPC port's connection settings.
Everything runs against a real in-process server on the demo checkpoint.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog

from moderation.serving.http import bodies
from moderation.serving.logs import configure_logging
from moderation.serving.planning_threads import INLINE_BYTES
from moderation.serving.settings import ServeSettings
from moderation.v1 import moderation_pb2 as pb
from moderation.v1 import moderation_pb2_grpc as pb_grpc
from tests.servers import InProcessServer, demo_server, free_port, http_call

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BYTES = 1024 * 1024
ROUTES = ("/v1/classify", "/v1/classify/batch", "/v1/moderations", "/v1/chat/moderations")


@pytest.fixture(scope="module")
def served(demo_checkpoint: Path) -> Iterator[InProcessServer]:
    with demo_server(
        demo_checkpoint,
        http_port=free_port(),
        auth_token=TOKEN,
        max_batch_items=8,
        max_messages=4,
        max_text_chars=2000,
        max_message_bytes=MAX_BYTES,
    ) as server:
        yield server


def post(
    served: InProcessServer, path: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], bytes]:
    url = f"http://127.0.0.1:{served.settings.http_port}{path}"
    status, _, raw = http_call(url, body, method="POST", headers={**AUTH, **(headers or {})})
    answer = json.loads(raw) if raw.startswith(b"{") else {}
    return status, answer.get("error", answer), raw


def raw_request(port: int, data: bytes, timeout: float = 30) -> bytes:
    """Bytes sent as they are (headers the standard library would refuse), the answer read."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


# ------------------------------------------------------- bodies within limits


@pytest.mark.parametrize("path", ROUTES)
def test_deep_nesting_is_a_400_on_every_route(served: InProcessServer, path: str) -> None:
    body = b'{"input": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    status, err, _ = post(served, path, body)
    assert status == 400 and "nests deeper than" in err["message"], err


@pytest.mark.parametrize("path", ROUTES)
def test_a_huge_integer_is_a_400_on_every_route(served: InProcessServer, path: str) -> None:
    status, err, raw = post(served, path, b'{"threshold": ' + b"9" * 5000 + b"}")
    assert status == 400 and "not JSON" in err["message"], err
    assert b"99999999999" not in raw  # the value is not echoed


@pytest.mark.parametrize("path", ROUTES)
def test_a_body_of_many_tiny_values_is_refused_before_decoding(
    served: InProcessServer, path: str
) -> None:
    body = b'{"requests": [' + b",".join([b"{}"] * 200_000) + b"]}"
    assert len(body) < MAX_BYTES
    status, err, _ = post(served, path, body)
    assert status == 413 and "JSON values" in err["message"], err


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/classify/batch", {"requests": [{"text": "a"}] * 9}, "requests"),
        ("/v1/classify", {"messages": [{"role": "user", "content": "a"}] * 5}, "messages"),
        ("/v1/moderations", {"input": ["a"] * 9}, "input"),
        ("/v1/chat/moderations", {"input": [[{"role": "user", "content": "a"}]] * 9}, "input"),
        ("/v1/chat/moderations", {"input": [{"role": "user", "content": "a"}] * 5}, "input"),
    ],
)
def test_count_limits_name_the_field_on_every_route(
    served: InProcessServer, path: str, body: Any, field: str
) -> None:
    status, err, _ = post(served, path, body)
    assert status == 400, err
    assert err.get("field", err.get("param")) == field, err
    assert "exceed the limit" in err["message"], err


def test_bodies_are_decoded_and_read_on_the_planning_threads(
    served: InProcessServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    decode = bodies.decode

    def recording(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return decode(*args, **kwargs)

    monkeypatch.setattr(bodies, "decode", recording)
    # Past the planning rule's size (smaller bodies are decoded on the loop: test_serving_path)
    padding = " " * INLINE_BYTES
    for path in ROUTES:
        post(served, path, json.dumps({"input": "hi", "text": "hi"}).encode() + padding.encode())
    assert len(threads) == len(ROUTES)
    assert all(name.startswith("plan") for name in threads), threads


def test_the_grpc_timeout_covers_parsing(
    served: InProcessServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    decode = bodies.decode

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(1.0)
        return decode(*args, **kwargs)

    monkeypatch.setattr(bodies, "decode", slow)
    body = b'{"text": "hi"}' + b" " * INLINE_BYTES  # decoded on a planning thread
    for path in ("/v1/classify", "/v1/moderations", "/v1/chat/completions"):
        status, err, _ = post(served, path, body, {"grpc-timeout": "100m"})
        assert (status, err["status"]) == (504, "DEADLINE_EXCEEDED"), err


# ------------------------------------------------------- no 5xx, capped echoes


def test_an_undecodable_authorization_header_is_a_401(served: InProcessServer) -> None:
    port = served.settings.http_port
    answer = raw_request(
        port,
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\xe9t\r\n"
        b"Content-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]


def test_a_token_followed_by_a_suffix_is_refused_on_both_transports(
    served: InProcessServer,
) -> None:
    for sent in (f"Bearer {TOKEN}x", f"Bearer {TOKEN}{TOKEN}", f"Bearer {TOKEN[:-1]}"):
        status, err, _ = post(served, "/v1/classify", {"text": "hi"}, {"Authorization": sent})
        assert (status, err["status"]) == (401, "UNAUTHENTICATED"), sent
        stub = pb_grpc.ModerationServiceStub(grpc.insecure_channel(served.address))
        with pytest.raises(grpc.RpcError) as exc:
            stub.Classify(
                pb.ClassifyRequest(text="hi"), metadata=(("authorization", sent),), timeout=30
            )
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    status, _, _ = post(served, "/v1/classify", {"text": "hi"})
    assert status == 200  # the exact token still passes


def test_errors_and_logs_quote_only_a_prefix_of_caller_values(
    served: InProcessServer, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("info")
    try:
        huge = "k" * 500_000
        answers = [
            post(served, "/v1/classify", {huge: 1}),
            post(served, "/v1/classify/batch", {"requests": [{huge: 1}]}),
            post(served, "/v1/moderations", {"input": "hi", huge: 1}),
            post(served, "/v1/moderations", {"input": "hi", "model": huge}),
            post(served, "/v1/classify", {"text": "hi", "role": huge}),
            post(served, "/v1/classify", {"text": "hi", "categoryThresholds": {huge: 0.5}}),
        ]
        for status, err, raw in answers:
            assert 400 <= status < 500, err
            assert len(raw) < 2048, (status, raw[:200])
        logged = capsys.readouterr().err
    finally:
        structlog.reset_defaults()
    lines = [line for line in logged.splitlines() if '"transport": "http"' in line]
    assert len(lines) >= len(answers)
    assert all(len(line) < 2048 for line in lines), max(len(line) for line in lines)


def test_a_status_message_is_capped_whatever_its_source(served: InProcessServer) -> None:
    # A message the servicer builds from a long value (a policy name) is cut at 512 characters
    # on both transports; json_format's own messages go through the same cap.
    stub = pb_grpc.ModerationServiceStub(grpc.insecure_channel(served.address))
    with pytest.raises(grpc.RpcError) as exc:
        stub.Classify(
            pb.ClassifyRequest(text="hi", policy="p" * 100_000),
            metadata=(("authorization", f"Bearer {TOKEN}"),),
            timeout=30,
        )
    assert len(exc.value.details() or "") <= 520
    status, err, _ = post(served, "/v1/classify", {"text": "hi", "policy": "p" * 100_000})
    assert status == 400 and len(err["message"]) <= 520


def test_the_message_cap_is_what_cuts_long_messages() -> None:
    from moderation.serving.calls import MAX_ERROR_CHARS, capped

    assert capped("x" * 10) == "x" * 10
    assert len(capped("x" * 10_000)) == MAX_ERROR_CHARS + 3


# ------------------------------------------------------- connections


@pytest.fixture(scope="module")
def strict(demo_checkpoint: Path) -> Iterator[InProcessServer]:
    """A server whose HTTP port keeps connections briefly and holds at most 4."""
    with demo_server(
        demo_checkpoint,
        http_port=free_port(),
        handshake_timeout=0.5,
        max_connection_idle=1.0,
        body_read_timeout=0.5,
        max_connections=4,
    ) as server:
        yield server


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` within `seconds` (EOF or reset)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def wait_for(condition: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def connect(server: InProcessServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.settings.http_port), timeout=10)


def test_slow_headers_and_idle_connections_are_closed(strict: InProcessServer) -> None:
    silent, slow = connect(strict), connect(strict)
    slow.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    assert closed_within(silent, 15) and closed_within(slow, 15)
    silent.close()
    slow.close()
    kept = connect(strict)  # a kept-alive connection after its answer: idle, then closed
    kept.sendall(b"GET /v1/model HTTP/1.1\r\nHost: x\r\n\r\n")
    assert kept.recv(4096).startswith(b"HTTP/1.1 200")
    assert closed_within(kept, 15)
    kept.close()


def test_a_slow_body_gets_408(strict: InProcessServer) -> None:
    with connect(strict) as sock:
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        sock.settimeout(15)
        assert sock.recv(4096).startswith(b"HTTP/1.1 408")


def test_connections_past_the_cap_get_503_and_are_counted(strict: InProcessServer) -> None:
    registry = strict.server.metrics.registry
    before = registry.get_sample_value("http_server_connections_refused_total") or 0.0
    http = strict.server.http
    assert http is not None
    wait_for(lambda: not http.connections.open)  # the earlier tests' connections are gone
    held = [connect(strict) for _ in range(4)]
    try:
        wait_for(lambda: len(http.connections.open) == 4)  # the server has accepted them
        with connect(strict) as extra:
            extra.settimeout(10)
            assert extra.recv(4096).startswith(b"HTTP/1.1 503")
        after = registry.get_sample_value("http_server_connections_refused_total")
        assert after == before + 1
    finally:
        for sock in held:
            sock.close()


def test_the_connection_cap_reaches_grpc() -> None:
    options = dict(ServeSettings(max_connections=7).grpc_options())
    assert options["grpc.max_allowed_incoming_connections"] == 7


def test_openai_answers_say_every_category_applies_to_text(served: InProcessServer) -> None:
    status, answer, _ = post(served, "/v1/moderations", {"input": ["hi", "there"]})
    assert status == 200, answer
    for result in answer["results"]:
        applied = result["category_applied_input_types"]
        assert set(applied) == set(result["categories"]) == set(result["category_scores"])
        assert len(applied) >= 3 and all(types == ["text"] for types in applied.values())


def test_the_servicer_caps_its_status_messages() -> None:
    # A domain error whose message is long (the mapping's last line of defence): the gRPC status
    # sent is capped by the same function as the HTTP error body.
    import asyncio

    from moderation.core.errors import InvalidArgument
    from moderation.serving.grpc.errors import abort_with
    from moderation.serving.http.status import field_of

    sent: list[str] = []
    fields: list[str | None] = []

    class Context:
        async def abort(self, code: Any, details: str, metadata: Any = ()) -> None:
            sent.append(details)
            fields.append(field_of(metadata))
            raise grpc.aio.AbortError()

    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(abort_with(Context(), InvalidArgument("text", "x" * 10_000)))  # type: ignore[arg-type]
    assert 0 < len(sent[0]) <= 515
    # the field too (in the rich details, which travel as metadata): it can be a caller's key
    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(abort_with(Context(), InvalidArgument("k" * 10_000, "unknown field")))  # type: ignore[arg-type]
    assert 0 < len(fields[1] or "") <= 515 and len(sent[1]) <= 515
