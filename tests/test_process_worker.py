"""The model in a process of its own (the server's default): the same answers as the model in the
server's process, errors and metrics across the pipe, cancellation, a clean stop, and what
happens when the model process dies. Real server, real engine, real child process."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from moderation.core.errors import InvalidArgument
from moderation.serving.metrics import Metrics
from moderation.serving.settings import ServeSettings
from moderation.serving.worker import (
    DeadlineExpiredError,
    GenerationFailedError,
    QueueFullError,
    WorkerStoppedError,
)
from moderation.serving.worker.model_child import RecordingMetrics
from moderation.serving.worker.model_process import ProcessWorker, replay
from moderation.serving.worker.process_messages import WireError
from moderation.v1 import moderation_pb2 as pb
from moderation.v1 import moderation_pb2_grpc as pb_grpc
from tests.servers import (
    NOT_SERVING,
    SERVING,
    InProcessServer,
    demo_loader,
    free_port,
    health_status,
)

TEXTS = ["hello there", "buy cheap pills now", "you are a fool", "what is the weather"]


def settings(checkpoint: Path, **overrides: Any) -> ServeSettings:
    base: dict[str, Any] = dict(
        model=str(checkpoint), host="127.0.0.1", port=free_port(), metrics_port=free_port(),
        device="cpu", dtype="float32", max_new_tokens=4096,
    )  # fmt: skip
    base.update(overrides)
    return ServeSettings(**base)


@pytest.fixture(scope="module")
def process_server(demo_checkpoint: Path) -> Iterator[InProcessServer]:
    server = InProcessServer(settings(demo_checkpoint))  # default loader: a model process
    server.wait_loaded()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def thread_server(demo_checkpoint: Path) -> Iterator[InProcessServer]:
    server = InProcessServer(
        settings(demo_checkpoint, model_process=False), demo_loader(demo_checkpoint)
    )
    server.wait_loaded()
    yield server
    server.stop()


def stub_of(server: InProcessServer) -> pb_grpc.ModerationServiceStub:
    return pb_grpc.ModerationServiceStub(grpc.insecure_channel(server.address))


def test_the_model_runs_in_another_process_without_weights_here(
    process_server: InProcessServer,
) -> None:
    worker = process_server.server.state.worker
    assert isinstance(worker, ProcessWorker)
    assert worker._process.pid != os.getpid() and worker._process.is_alive()
    front = process_server.server.state.front
    assert front is not None and process_server.server.runtime is None  # no model here
    info = stub_of(process_server).GetModelInfo(pb.GetModelInfoRequest())
    assert info.demo and info.attention_backend == "sdpa" and info.sliding_window > 0
    limits = front.model.limits  # reported by the model process, planned with here
    assert (info.sliding_window, info.max_context_tokens) == (limits.window, limits.context)
    assert (info.generation_slots, info.kv_cache_bytes) == (limits.generation_slots,
                                                            limits.kv_cache_bytes)  # fmt: skip
    assert info.generation_slots > 0 and info.cpu_gemm == limits.cpu_gemm
    assert front.planner.limits == limits


def test_answers_equal_the_model_in_the_server_process(
    process_server: InProcessServer, thread_server: InProcessServer
) -> None:
    here, there = stub_of(thread_server), stub_of(process_server)
    for text in TEXTS:
        for policy in ("paper", "mistral-13"):
            request = pb.ClassifyRequest(text=text, policy=policy)
            a, b = here.Classify(request), there.Classify(request)
            assert (a.category, a.flagged, a.model) == (b.category, b.flagged, b.model)
            for key, value in a.scores.items():
                assert b.scores[key] == pytest.approx(value, abs=1e-5)
    batch = pb.ClassifyBatchRequest(requests=[pb.ClassifyRequest(text=t) for t in TEXTS])
    assert [r.category for r in there.ClassifyBatch(batch).results] == [
        r.category for r in here.ClassifyBatch(batch).results
    ]
    chat = pb.GenerateRequest(
        messages=[pb.ChatMessage(role="user", content="Tell me a story")],
        max_new_tokens=10, moderate_input=True, moderate_output=True,
    )  # fmt: skip
    a_gen, b_gen = here.Generate(chat), there.Generate(chat)
    assert (a_gen.text, a_gen.completion_tokens) == (b_gen.text, b_gen.completion_tokens)
    streamed = list(there.GenerateStream(chat))
    assert "".join(m.delta for m in streamed if m.delta) == b_gen.text
    assert streamed[-1].final.text == b_gen.text
    # Checked as it grows: the same chunks released at the same checks in both.
    checked = pb.GenerateStreamRequest(
        messages=[pb.ChatMessage(role="user", content="Tell me a story")],
        max_new_tokens=12, moderate_output=True, threshold=1.0, stream_check_tokens=3,
    )  # fmt: skip
    a_events, b_events = list(here.GenerateStream(checked)), list(there.GenerateStream(checked))
    assert [e.delta for e in a_events[:-1]] == [e.delta for e in b_events[:-1]]
    assert len(b_events) > 2
    assert a_events[-1].final.released_tokens == b_events[-1].final.released_tokens > 0


def test_a_conversation_crosses_to_the_model_process_with_its_context(
    process_server: InProcessServer, thread_server: InProcessServer
) -> None:
    messages = [
        pb.ChatMessage(role="system", content="Be brief."),
        pb.ChatMessage(role="user", content="Bread?"),
        pb.ChatMessage(role="assistant", content="Knead it."),
    ]
    request = pb.ClassifyRequest(messages=messages, policy="mistral-13")
    a, b = stub_of(thread_server).Classify(request), stub_of(process_server).Classify(request)
    assert (a.category, a.prompt_tokens, a.context_tokens) == (
        b.category, b.prompt_tokens, b.context_tokens
    )  # fmt: skip
    assert b.context_tokens > 0 and b.context_messages_dropped == 0
    for key, value in a.scores.items():
        assert b.scores[key] == pytest.approx(value, abs=1e-5)


def test_bad_requests_are_refused_at_the_door_and_the_model_keeps_serving(
    process_server: InProcessServer,
) -> None:
    stub = stub_of(process_server)
    with pytest.raises(grpc.RpcError) as err:
        stub.Classify(pb.ClassifyRequest(text="x", policy="nope"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "policy" in err.value.details()
    assert stub.Classify(pb.ClassifyRequest(text="still here")).model


def test_errors_cross_the_pipe_as_the_same_exceptions() -> None:
    for exc in (
        InvalidArgument("messages", "too long"),
        QueueFullError("full"),
        DeadlineExpiredError("late"),
        WorkerStoppedError("stopping"),
        GenerationFailedError("generation failed: not finite"),
        RuntimeError("boom"),
    ):
        back = WireError.of(exc).exception()
        assert type(back) is type(exc)
        if isinstance(exc, InvalidArgument):
            assert isinstance(back, InvalidArgument) and back.field == "messages"
        else:
            assert str(exc) in str(back)


def test_metrics_recorded_in_the_model_process_are_replayed_here() -> None:
    recorded = RecordingMetrics()
    recorded.batch_size.labels(kind="classify").observe(5)
    recorded.tokens.labels(kind="computed").inc(42)
    recorded.queue_depth.set(3)
    recorded.prefix_hits.inc(5)
    metrics = Metrics.create()
    replay(metrics, recorded.take())
    assert recorded.take() == []
    get = metrics.registry.get_sample_value
    assert get("moderation_batch_size_sum", {"kind": "classify"}) == 5
    assert get("moderation_tokens_total", {"kind": "computed"}) == 42
    assert get("moderation_queue_depth") == 3
    assert get("moderation_prefix_reuse_hits_total") == 5


def test_the_worker_metrics_reach_the_endpoint(process_server: InProcessServer) -> None:
    stub_of(process_server).Classify(pb.ClassifyRequest(text="count me"))
    url = f"http://127.0.0.1:{process_server.settings.metrics_port}/metrics"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        if 'moderation_tokens_total{kind="computed"}' in body:
            break
        time.sleep(0.2)
    assert 'moderation_batch_size_count{kind="classify"}' in body
    assert 'moderation_tokens_total{kind="computed"}' in body


def test_a_cancelled_stream_stops_generating_in_the_model_process(
    process_server: InProcessServer,
) -> None:
    stub = stub_of(process_server)
    chat = pb.GenerateRequest(
        messages=[pb.ChatMessage(role="user", content="Go on forever")], max_new_tokens=4000
    )
    call = stub.GenerateStream(chat)
    next(iter(call))  # it started
    call.cancel()
    worker = process_server.server.state.worker
    assert isinstance(worker, ProcessWorker)
    deadline = time.monotonic() + 10
    while worker.queue_depth and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.queue_depth == 0  # this side forgot it and told the model process

    def computed() -> float:
        value = process_server.server.metrics.registry.get_sample_value(
            "moderation_tokens_total", {"kind": "computed"}
        )
        return value or 0.0

    time.sleep(1.0)  # metrics arrive every 0.25 s
    before = computed()
    time.sleep(1.0)
    # 4000 tokens would take many seconds more; a stopped generation computes nothing.
    assert computed() == before


def test_a_stop_ends_the_model_process_cleanly(demo_checkpoint: Path) -> None:
    server = InProcessServer(settings(demo_checkpoint))
    server.wait_loaded()
    worker = server.server.state.worker
    assert isinstance(worker, ProcessWorker)
    assert stub_of(server).Classify(pb.ClassifyRequest(text="last one")).model
    server.stop()
    assert worker._process.exitcode == 0


def test_a_dead_model_process_fails_calls_and_reports_not_serving(demo_checkpoint: Path) -> None:
    server = InProcessServer(settings(demo_checkpoint))
    server.wait_loaded()
    try:
        worker = server.server.state.worker
        assert isinstance(worker, ProcessWorker) and worker._process.pid is not None
        channel = grpc.insecure_channel(server.address)
        stub = pb_grpc.ModerationServiceStub(channel)
        assert stub.Classify(pb.ClassifyRequest(text="alive")).model
        os.kill(worker._process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while health_status(channel) != NOT_SERVING and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health_status(channel) == NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(pb.ClassifyRequest(text="anyone?"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "model process exited" in err.value.details()
    finally:
        server.stop()


def test_a_hung_model_process_turns_health_not_serving(demo_checkpoint: Path) -> None:
    # Issue #11, point 6: a stopped (SIGSTOP) model process used to look healthy.
    server = InProcessServer(settings(demo_checkpoint, model_stall_timeout=1.0))
    server.wait_loaded()
    worker = server.server.state.worker
    assert isinstance(worker, ProcessWorker) and worker._process.pid is not None
    pid = worker._process.pid
    channel = grpc.insecure_channel(server.address)
    stub = pb_grpc.ModerationServiceStub(channel)
    try:
        assert stub.Classify(pb.ClassifyRequest(text="alive")).model
        time.sleep(2)  # idle for longer than the timeout: idle is not hung
        assert health_status(channel) == SERVING
        os.kill(pid, signal.SIGSTOP)
        waiting = stub.Classify.future(pb.ClassifyRequest(text="anyone?"), timeout=60)
        deadline = time.monotonic() + 15
        while health_status(channel) != NOT_SERVING and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health_status(channel) == NOT_SERVING
        registry = server.server.metrics.registry
        assert registry.get_sample_value("moderation_model_stalled") == 1
        os.kill(pid, signal.SIGCONT)  # it moves again: SERVING again, the call answered
        assert waiting.result(timeout=30).model
        deadline = time.monotonic() + 15
        while health_status(channel) != SERVING and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health_status(channel) == SERVING
    finally:
        os.kill(pid, signal.SIGCONT)
        server.stop()


def test_a_stopped_model_process_is_found_whatever_the_callers_deadlines(
    demo_checkpoint: Path,
) -> None:
    # Issue #19: expired calls leave the queue, and an empty queue used to hide the hang (12/12
    # DEADLINE_EXCEEDED, health SERVING throughout). The model process answers the watchdog's
    # pings, idle or busy: stopped, it goes NOT_SERVING with nothing queued.
    server = InProcessServer(settings(demo_checkpoint, model_stall_timeout=1.0))
    server.wait_loaded()
    worker = server.server.state.worker
    assert isinstance(worker, ProcessWorker) and worker._process.pid is not None
    pid = worker._process.pid
    channel = grpc.insecure_channel(server.address)
    stub = pb_grpc.ModerationServiceStub(channel)
    try:
        os.kill(pid, signal.SIGSTOP)
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(pb.ClassifyRequest(text="anyone?"), timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 15
        while worker.queue_depth and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.queue_depth == 0  # nothing queued: only the ping can tell
        while health_status(channel) != NOT_SERVING and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health_status(channel) == NOT_SERVING
        os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 15
        while health_status(channel) != SERVING and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health_status(channel) == SERVING
    finally:
        os.kill(pid, signal.SIGCONT)
        server.stop()


def test_moderate_stream_crosses_to_the_model_process(process_server: InProcessServer) -> None:
    """ModerateStream's checks run in the model process: the final verdict equals Classify,
    and a caller that hangs up leaves nothing pending on the server's side."""
    stub = stub_of(process_server)
    answer = "It is sunny today in Paris, with a light breeze from the west and no rain."
    opened = pb.ModerateStreamOpen(prompt="Weather?", check_tokens=4, threshold=1.0)
    requests = [
        pb.ModerateStreamRequest(open=opened),
        *(pb.ModerateStreamRequest(delta=answer[i : i + 7]) for i in range(0, len(answer), 7)),
        pb.ModerateStreamRequest(done=True),
    ]
    verdicts = list(stub.ModerateStream(iter(requests), timeout=60))
    whole = stub.Classify(
        pb.ClassifyRequest(text=answer, role=pb.ROLE_OUTPUT, prompt="Weather?", threshold=1.0)
    )
    assert len(verdicts) > 2 and verdicts[-1].complete
    for k, v in whole.scores.items():
        assert verdicts[-1].result.scores[k] == pytest.approx(v, abs=1e-4)

    gate = threading.Event()

    def never_done() -> Iterator[pb.ModerateStreamRequest]:
        yield from requests[:3]
        gate.wait(30)

    call = stub.ModerateStream(never_done(), timeout=60)
    assert not next(call).complete
    worker = process_server.server.state.worker
    assert isinstance(worker, ProcessWorker)
    # open and waiting for its caller: not queued work (the hang watchdog reads queue_depth)
    assert worker.queue_depth == 0 and len(worker._pending) == 1
    call.cancel()
    gate.set()
    deadline = time.monotonic() + 30
    while worker._pending or process_server.server.state.open_checks:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _scrape(server: InProcessServer) -> dict[str, float]:
    """The metrics endpoint's samples, by `name{labels}` as written."""
    url = f"http://127.0.0.1:{server.settings.metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    samples = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def _until(check: Any, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def test_the_model_process_own_metrics_on_the_one_port(process_server: InProcessServer) -> None:
    stub = stub_of(process_server)
    stub.Classify(pb.ClassifyRequest(text="measure me"))
    call = stub.GenerateStream(pb.GenerateStreamRequest(
        messages=[pb.ChatMessage(role="user", content="Go on forever")], max_new_tokens=4000,
    ))  # fmt: skip
    next(iter(call))  # generating: its sequence holds a cache slot
    busy = _until(lambda: (s := _scrape(process_server))["moderation_kv_cache_tokens_in_use"] > 0
                  and s)  # fmt: skip
    call.cancel()
    assert busy, "the cache never showed the running generation"
    assert busy["moderation_kv_cache_slots_in_use"] >= 1
    assert busy["moderation_kv_cache_slots"] >= busy["moderation_kv_cache_slots_in_use"]
    assert busy["moderation_kv_cache_tokens"] >= busy["moderation_kv_cache_tokens_in_use"]
    assert busy["moderation_queue_wait_seconds_count"] >= 2
    assert busy['moderation_model_seconds_count{kind="classify"}'] >= 1
    assert busy["moderation_step_seconds_count"] >= 1
    assert busy['moderation_batch_size_count{kind="generate"}'] >= 1
    # The model process's own process_* series: another process, started after this one.
    worker = process_server.server.state.worker
    assert isinstance(worker, ProcessWorker)
    assert busy["moderation_model_process_resident_memory_bytes"] > 0
    assert busy["moderation_model_process_start_time_seconds"] >= busy["process_start_time_seconds"]
    idle = _until(lambda: (s := _scrape(process_server))["moderation_kv_cache_slots_in_use"] == 0
                  and s)  # fmt: skip
    assert idle and idle["moderation_kv_cache_tokens_in_use"] == 0  # the cancelled one left
    generated = 'moderation_model_seconds_count{kind="generate"}'
    assert idle.get(generated, 0) == busy.get(generated, 0)  # cancelled: no answer, no time


@pytest.mark.parametrize("model_process", [True, False])
def test_a_batch_wait_gathers_requests_into_one_pass(
    demo_checkpoint: Path, model_process: bool
) -> None:
    """--batch-wait-ms: a pass waits (up to that long) for more requests; without it the second
    request, sent 100 ms after the first, gets a pass of its own."""
    passes = 'moderation_batch_size_count{kind="classify"}'
    texts = 'moderation_batch_size_sum{kind="classify"}'
    for wait_ms, expected_passes in ((1000.0, 1), (0.0, 2)):
        loader = None if model_process else demo_loader(demo_checkpoint)
        server = InProcessServer(
            settings(
                demo_checkpoint, batch_wait_ms=wait_ms, model_process=model_process,
                max_batch_size=4,
            ),
            *([loader] if loader else []),
        )  # fmt: skip
        try:
            server.wait_loaded()
            stub = stub_of(server)
            before = _scrape(server)
            first = stub.Classify.future(pb.ClassifyRequest(text=TEXTS[0]), timeout=60)
            time.sleep(0.1)
            second = stub.Classify.future(pb.ClassifyRequest(text=TEXTS[1]), timeout=60)
            assert first.result().category and second.result().category
            after = _until(
                lambda server=server, before=before: (
                    (s := _scrape(server)).get(texts, 0) - before.get(texts, 0) >= 2 and s
                )
            )
            assert after, "the two texts never showed in the batch-size metric"
            assert after[passes] - before.get(passes, 0) == expected_passes, wait_ms
        finally:
            server.stop()
