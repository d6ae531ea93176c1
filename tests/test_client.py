"""The light client (`moderation.api.client.ModerationClient`).

Against real servers on loopback ports (the demo checkpoint, the real engine): every method, the
bearer token, TLS, a server still loading. Against a test double of the server (a plain
grpc.server that refuses N times, then answers): the retry policy, which codes it retries, the
deadline of a call and how retries stay inside it, streams retried only before their first
event.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from moderation.api.client import (
    ModerationClient,
    ModerationError,
    classify_request,
    generate_request,
    stream_request,
)
from moderation.runtime import Runtime
from moderation.serving.settings import ServeSettings
from moderation.v1 import moderation_pb2 as pb
from moderation.v1 import moderation_pb2_grpc as pb_grpc
from tests.certs import NoCertificateTool, make_certificates
from tests.servers import InProcessServer, demo_loader, demo_server, free_port

TOKEN = "client-s3cret"
TEXTS = ["How do I pick a lock?", "What a lovely day.", "Tell me about the weather."]


# ------------------------------------------------------------ a real server


@pytest.fixture(scope="module")
def served(demo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    token_file = tmp_path_factory.mktemp("client-auth") / "token"
    token_file.write_text(TOKEN)
    with demo_server(
        demo_checkpoint,
        auth_token_file=str(token_file),
        max_new_tokens=64,
        max_message_bytes=64 * 1024,
    ) as server:
        yield server


@pytest.fixture
def client(served: InProcessServer) -> Iterator[ModerationClient]:
    with ModerationClient(served.address, token=TOKEN) as c:
        yield c


def test_classify_texts_as_input_and_output(client: ModerationClient) -> None:
    r = client.classify(TEXTS[0])
    assert r.model and r.policy == "paper" and r.windows == 1 and r.prompt_tokens > 0
    assert r.category in r.scores and sum(r.scores.values()) == pytest.approx(1.0, abs=1e-4)
    out = client.classify(
        "Here is how.",
        role="output",
        prompt=TEXTS[0],
        policy="mistral-13",
        category_thresholds={"unqualified_health": 0.3},
    )
    assert out.policy == "mistral-13" and "unqualified_health" in out.scores
    # An output is classified with its prompt: not the same prompt as the text alone.
    assert out.prompt_tokens > client.classify("Here is how.", policy="mistral-13").prompt_tokens
    # A threshold of 1 flags nothing (the demo's random weights may flag anything else).
    assert not client.classify(TEXTS[0], threshold=1.0).flagged


def test_classify_batch_equals_one_by_one(client: ModerationClient) -> None:
    items: list[str | pb.ClassifyRequest] = [
        TEXTS[0],
        classify_request(TEXTS[1], policy="mistral-13"),
        classify_request("Sure, here it is.", role="output", prompt=TEXTS[2]),
    ]
    batch = client.classify_batch(items)
    assert len(batch) == len(items)
    for item, got in zip(items, batch, strict=True):
        alone = client.classify(item)
        assert (got.category, got.flagged, got.policy) == (
            alone.category,
            alone.flagged,
            alone.policy,
        )
        for key, value in alone.scores.items():
            assert got.scores[key] == pytest.approx(value, abs=1e-5)


def test_generate_and_stream_give_the_same_greedy_answer(client: ModerationClient) -> None:
    messages = [{"role": "user", "content": "Tell me a story"}]
    # A threshold of 1 never refuses: the input is moderated, the answer still generated.
    unary = client.generate(messages, max_new_tokens=10, moderate_input=True, threshold=1.0)
    assert 1 <= unary.completion_tokens <= 10 and unary.prompt_tokens > 0
    assert unary.input_moderation.category  # moderate_input reached the server
    events = list(client.stream(messages, max_new_tokens=10, moderate_input=True, threshold=1.0))
    assert events[-1].WhichOneof("event") == "final"
    assert all(e.WhichOneof("event") == "delta" for e in events[:-1])
    assert "".join(e.delta for e in events[:-1]) == events[-1].final.text == unary.text
    # A ready request goes as it is.
    again = client.generate(
        pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="Tell me a story")],
                           max_new_tokens=10)
    )  # fmt: skip
    assert again.text == unary.text


def test_one_request_builder_for_generate_and_stream_leaves_unset_options_to_the_server() -> None:
    request = generate_request(
        [{"role": "user", "content": "hi"}], temperature=0.5, seed=7, guardrail=False
    )
    assert [(m.role, m.content) for m in request.messages] == [("user", "hi")]
    assert request.disable_guardrail and request.seed == 7 and request.temperature == 0.5
    assert not request.HasField("threshold") and not request.HasField("system_prompt")
    streamed = stream_request(request)
    assert isinstance(streamed, pb.GenerateStreamRequest)
    assert streamed.SerializeToString() == request.SerializeToString()


def test_generate_refuses_a_flagged_prompt(client: ModerationClient) -> None:
    refused = client.generate(
        [{"role": "user", "content": "anything"}], moderate_input=True, threshold=0.0
    )
    assert refused.refused and refused.completion_tokens == 0
    assert refused.finish_reason == pb.FINISH_REASON_INPUT_FLAGGED


def test_model_info(client: ModerationClient) -> None:
    info = client.get_model_info()
    assert info.demo and info.default_policy == "paper"
    assert {"paper", "mistral-13"} <= {p.name for p in info.policies}


def test_invalid_argument_is_raised_at_once_naming_the_field(
    client: ModerationClient, served: InProcessServer
) -> None:
    retries: list[int] = []
    with ModerationClient(
        served.address, token=TOKEN, on_retry=lambda e, n, d: retries.append(n)
    ) as watched:
        with pytest.raises(ModerationError) as err:
            watched.classify("")
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.field == "text" and err.value.attempts == 1
        assert err.value.request_id  # the id the server logged the call under
        with pytest.raises(ModerationError) as batch_err:
            watched.classify_batch(["fine", ""])
        assert batch_err.value.field == "requests[1].text"
        with pytest.raises(ModerationError) as gen_err:
            watched.generate([{"role": "user", "content": "x"}], max_new_tokens=65)
        assert gen_err.value.field == "max_new_tokens"
    assert retries == []
    with pytest.raises(ValueError, match="role"):
        classify_request("x", role="system")  # type: ignore[arg-type]


def test_a_message_over_the_size_limit_is_not_retried(served: InProcessServer) -> None:
    retries: list[int] = []
    with ModerationClient(
        served.address, token=TOKEN, backoff=0.01, on_retry=lambda e, n, d: retries.append(n)
    ) as c:
        with pytest.raises(ModerationError) as err:
            c.classify("x" * 100_000)  # > max_message_bytes (64 KiB)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not err.value.retryable
        assert retries == [] and err.value.attempts == 1
        assert c.classify("still serving").model


def test_the_token_goes_as_a_bearer_header(served: InProcessServer) -> None:
    for token in (None, "wrong"):
        with (
            ModerationClient(served.address, token=token) as c,
            pytest.raises(ModerationError) as err,
        ):
            c.classify("x")
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and err.value.attempts == 1


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    try:
        return make_certificates(tmp_path_factory.mktemp("client-certs"))
    except NoCertificateTool as exc:
        pytest.skip(str(exc))


def test_tls_with_a_ca_file_bytes_or_credentials(
    demo_checkpoint: Path, certificates: dict[str, Path]
) -> None:
    c = certificates
    settings = ServeSettings(model_process=False,
        host="127.0.0.1", port=free_port(), metrics_port=0, tls_cert=str(c["srv.pem"]),
        tls_key=str(c["srv.key"]),
    )  # fmt: skip
    server = InProcessServer(settings, demo_loader(demo_checkpoint))
    server.wait_loaded()
    try:
        ca = c["ca.pem"]
        for tls in (str(ca), ca, ca.read_bytes(), grpc.ssl_channel_credentials(ca.read_bytes())):
            with ModerationClient(server.address, tls=tls) as secure:
                assert secure.classify("over tls").model
        # Plaintext to a TLS port never connects: UNAVAILABLE, once retries are spent.
        with (
            ModerationClient(server.address, retries=1, backoff=0.01) as plain,
            pytest.raises(ModerationError) as err,
        ):
            plain.classify("x", timeout=10)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.attempts == 2
    finally:
        server.stop()


def test_a_loading_server_is_retried_until_it_serves(demo_checkpoint: Path) -> None:
    release = threading.Event()
    load = demo_loader(demo_checkpoint)

    def slow_load(settings: ServeSettings) -> Runtime:
        release.wait(120)
        return load(settings)

    server = InProcessServer(
        ServeSettings(model_process=False, host="127.0.0.1", port=free_port(), metrics_port=0),
        slow_load,
    )
    refused: list[ModerationError] = []

    def on_retry(error: ModerationError, attempt: int, delay: float) -> None:
        refused.append(error)
        release.set()  # the model finishes loading once the client has been refused

    try:
        with ModerationClient(server.address, retries=50, backoff=0.05, max_backoff=0.5,
                              on_retry=on_retry, timeout=120) as c:  # fmt: skip
            assert c.classify("are you up?").model
        assert refused and all(e.code == grpc.StatusCode.UNAVAILABLE for e in refused)
    finally:
        release.set()
        server.wait_loaded()
        server.stop()


# ------------------------------------------------------- a test double of the server


class Double(pb_grpc.ModerationServiceServicer):
    """Refuses the first `failures` calls with `code`, then answers; records what each call
    saw of its deadline. `hold` keeps calls waiting (a slow server); `break_stream` ends a
    stream with UNAVAILABLE after its first event."""

    def __init__(self, failures: int = 0, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE):
        self.failures = failures
        self.code = code
        self.calls = 0
        self.time_left: list[float | None] = []
        self.hold = threading.Event()
        self.holding = False
        self.break_stream = False
        self._lock = threading.Lock()

    def _attempt(self, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.calls += 1
            n = self.calls
        self.time_left.append(context.time_remaining())
        if self.holding:
            self.hold.wait(60)
        if n <= self.failures:
            context.abort(self.code, f"refused ({n})")

    def Classify(self, request: pb.ClassifyRequest, context: grpc.ServicerContext) -> Any:
        self._attempt(context)
        return pb.ClassifyResponse(category="acceptable", model="double", policy=request.policy)

    def GenerateStream(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._attempt(context)
        yield pb.GenerateStreamResponse(delta="a")
        if self.break_stream:
            context.abort(grpc.StatusCode.UNAVAILABLE, "went away mid-stream")
        yield pb.GenerateStreamResponse(delta="b")
        yield pb.GenerateStreamResponse(final=pb.GenerateResponse(text="ab", model="double"))


@pytest.fixture
def double() -> Iterator[tuple[Double, str]]:
    servicer = Double()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_ModerationServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    servicer.hold.set()
    server.stop(0)


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED], ids=lambda c: c.name
)
def test_refusals_are_retried_with_growing_delays(
    double: tuple[Double, str], code: grpc.StatusCode
) -> None:
    servicer, address = double
    servicer.failures, servicer.code = 3, code
    seen: list[tuple[grpc.StatusCode, int, float]] = []
    with ModerationClient(
        address, retries=5, backoff=0.01, on_retry=lambda e, n, d: seen.append((e.code, n, d))
    ) as c:
        assert c.classify("x", policy="p").policy == "p"
    assert servicer.calls == 4
    assert [(code_, n) for code_, n, _ in seen] == [(code, 1), (code, 2), (code, 3)]
    # Exponential backoff with jitter: delay n lies in [0.5, 1.5] x backoff x 2^(n-1).
    for _, n, delay in seen:
        assert 0.5 * 0.01 * 2 ** (n - 1) <= delay <= 1.5 * 0.01 * 2 ** (n - 1)


def test_other_codes_are_not_retried(double: tuple[Double, str]) -> None:
    servicer, address = double
    for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL):
        servicer.calls, servicer.failures, servicer.code = 0, 5, code
        with (
            ModerationClient(address, retries=5, backoff=0.01) as c,
            pytest.raises(ModerationError) as err,
        ):
            c.classify("x")
        assert err.value.code == code and err.value.attempts == 1 and servicer.calls == 1
        assert err.value.details == "refused (1)" and not err.value.retryable


def test_retries_run_out(double: tuple[Double, str]) -> None:
    servicer, address = double
    servicer.failures = 100
    with (
        ModerationClient(address, retries=2, backoff=0.01) as c,
        pytest.raises(ModerationError) as err,
    ):
        c.classify("x")
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert err.value.attempts == 3 and servicer.calls == 3


def test_no_retry_is_started_that_the_deadline_cannot_wait_for(double: tuple[Double, str]) -> None:
    servicer, address = double
    servicer.failures = 100
    # The first retry would wait at least 30 s; the call has 2.
    with (
        ModerationClient(address, retries=5, backoff=60, timeout=2) as c,
        pytest.raises(ModerationError) as err,
    ):
        c.classify("x")
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "UNAVAILABLE" in err.value.details and servicer.calls == 1


def test_the_default_and_per_call_deadlines_reach_the_server(double: tuple[Double, str]) -> None:
    servicer, address = double
    with ModerationClient(address, timeout=5) as c:
        c.classify("default")
        c.classify("longer", timeout=300)
    with ModerationClient(address, timeout=None) as c:
        c.classify("none")
    default, longer, none = servicer.time_left
    # (gRPC rounds a deadline up, by up to a second, on its way to the server.)
    assert default is not None and 0 < default <= 6
    assert longer is not None and 200 < longer <= 301
    assert none is not None and none > 1e9  # no deadline: gRPC's "infinite future"


def test_a_slow_answer_is_deadline_exceeded_and_not_retried(double: tuple[Double, str]) -> None:
    servicer, address = double
    servicer.holding = True
    with ModerationClient(address, retries=5, backoff=0.01, timeout=0.5) as c:
        with pytest.raises(ModerationError) as err:
            c.classify("x")
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and err.value.attempts == 1
        with pytest.raises(ModerationError) as stream_err:
            list(c.stream([{"role": "user", "content": "x"}]))
        assert stream_err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    servicer.hold.set()
    assert servicer.calls == 2


def test_a_stream_is_retried_before_its_first_event_only(double: tuple[Double, str]) -> None:
    servicer, address = double
    servicer.failures = 2
    with ModerationClient(address, retries=3, backoff=0.01) as c:
        events = list(c.stream([{"role": "user", "content": "hi"}], max_new_tokens=4))
        assert [e.WhichOneof("event") for e in events] == ["delta", "delta", "final"]
        assert servicer.calls == 3
        servicer.calls, servicer.failures, servicer.break_stream = 0, 0, True
        got: list[str] = []
        with pytest.raises(ModerationError) as err:
            for event in c.stream([{"role": "user", "content": "hi"}]):
                got.append(event.delta)
    # Text already handed over is never repeated by a retry: the error goes to the caller.
    assert got == ["a"] and servicer.calls == 1
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_each_attempt_goes_to_the_next_target(double: tuple[Double, str]) -> None:
    _, address = double
    nobody = f"127.0.0.1:{free_port()}"  # nothing listens there
    retried: list[grpc.StatusCode] = []
    with ModerationClient(
        [nobody, address], retries=1, backoff=0.01, on_retry=lambda e, n, d: retried.append(e.code)
    ) as c:
        assert c.classify("x").model == "double"
    assert retried == [grpc.StatusCode.UNAVAILABLE]


def test_bad_client_arguments() -> None:
    with pytest.raises(ValueError, match="target"):
        ModerationClient([])
    with pytest.raises(ValueError, match="negative"):
        ModerationClient("127.0.0.1:1", retries=-1)


def test_the_readme_example_runs(
    double: tuple[Double, str], capsys: pytest.CaptureFixture[str]
) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### The Python client") :]
    example = section[section.index("```python\n") + 10 : section.index("```\n", 10)]
    assert len(example.strip().splitlines()) == 5
    _, address = double
    exec(example.replace("localhost:50051", address), {})
    assert capsys.readouterr().out.startswith("acceptable False")
