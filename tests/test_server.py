"""The gRPC service end to end: a real server on a loopback port, real gRPC clients, the real
engine on the demo checkpoint."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
import torch

from moderation.runtime import Runtime
from moderation.serving.logs import configure_logging
from moderation.serving.worker.job import Job
from moderation.serving.worker.worker_thread import WorkerThread
from moderation.v1 import moderation_pb2 as pb
from moderation.v1 import moderation_pb2_grpc as pb_grpc
from tests.servers import InProcessServer, demo_server, free_port, invalid_field

TEXTS = [
    f"message number {i}: {w}" for i, w in enumerate(["hello", "buy now", "you fool", "pills"] * 16)
]


@pytest.fixture(scope="module")
def served(demo_checkpoint: Path):  # type: ignore[no-untyped-def]
    with demo_server(
        demo_checkpoint,
        metrics_port=free_port(),
        max_batch_items=8,
        max_text_chars=2000,
        max_new_tokens=512,
        max_message_bytes=64 * 1024,
    ) as server:
        yield server


def user(text: str) -> list[pb.ChatMessage]:
    return [pb.ChatMessage(role="user", content=text)]


# ------------------------------------------------------------------ every RPC


def test_classify(stub: pb_grpc.ModerationServiceStub) -> None:
    r = stub.Classify(pb.ClassifyRequest(text="hello there", policy="mistral-13"))
    assert r.policy == "mistral-13" and "demo" in r.model
    assert len(r.scores) == 14 and sum(r.scores.values()) == pytest.approx(1.0, abs=1e-4)
    assert r.category in r.scores and r.windows == 1 and r.prompt_tokens > 0
    out = stub.Classify(
        pb.ClassifyRequest(text="Sure, here it is.", role=pb.ROLE_OUTPUT, prompt="Help me?")
    )
    assert out.policy == "paper" and set(out.paper_scores) == set(out.scores)


def test_classify_batch_equals_one_by_one(stub: pb_grpc.ModerationServiceStub) -> None:
    requests = [
        pb.ClassifyRequest(text=t, policy=p) for t in TEXTS[:4] for p in ("paper", "mistral-13")
    ]
    batch = stub.ClassifyBatch(pb.ClassifyBatchRequest(requests=requests)).results
    assert len(batch) == len(requests)
    for request, got in zip(requests, batch, strict=True):
        alone = stub.Classify(request)
        assert got.category == alone.category and got.flagged == alone.flagged
        for key, value in alone.scores.items():
            assert got.scores[key] == pytest.approx(value, abs=1e-5)


def test_generate_and_stream(stub: pb_grpc.ModerationServiceStub) -> None:
    request = pb.GenerateRequest(messages=user("Tell me a story"), max_new_tokens=12)
    unary = stub.Generate(request)
    assert unary.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert 1 <= unary.completion_tokens <= 12 and unary.prompt_tokens > 0
    events = list(stub.GenerateStream(request))
    assert events[-1].WhichOneof("event") == "final"
    deltas = [e.delta for e in events[:-1]]
    assert all(e.WhichOneof("event") == "delta" for e in events[:-1])
    assert "".join(deltas) == events[-1].final.text == unary.text  # greedy: same answer


STREAM_DEADLINE_S = 60
"""A flagged stream must end by itself: past this it failed (DEADLINE_EXCEEDED), rather than
leaving the test to hang until the suite's timeout."""


def test_guarded_generation_refuses_and_withholds(stub: pb_grpc.ModerationServiceStub) -> None:
    refused = stub.Generate(
        pb.GenerateRequest(messages=user("hi"), moderate_input=True, threshold=0.0)
    )
    assert refused.refused and refused.finish_reason == pb.FINISH_REASON_INPUT_FLAGGED
    assert refused.completion_tokens == 0 and refused.input_moderation.flagged
    events = list(
        stub.GenerateStream(
            pb.GenerateStreamRequest(
                messages=user("hi"), moderate_output=True, threshold=0.0, max_new_tokens=6
            ),
            timeout=STREAM_DEADLINE_S,  # a stream that never ends fails here, not by hanging
        )
    )
    assert [e.WhichOneof("event") for e in events] == ["final"]  # nothing unchecked was sent
    assert events[0].final.finish_reason == pb.FINISH_REASON_OUTPUT_FLAGGED
    assert events[0].final.text == "" and events[0].final.output_moderation.flagged


def test_stream_releases_checked_chunks_before_the_end(
    stub: pb_grpc.ModerationServiceStub,
) -> None:
    plain = stub.Generate(pb.GenerateRequest(messages=user("Tell me a story"), max_new_tokens=24))
    # threshold 1.0: the random demo model's checks all pass.
    request = pb.GenerateStreamRequest(
        messages=user("Tell me a story"), moderate_output=True, threshold=1.0,
        max_new_tokens=24, stream_check_tokens=4,
    )  # fmt: skip
    events = list(stub.GenerateStream(request))
    final = events[-1].final
    deltas = [e.delta for e in events[:-1]]
    assert all(e.WhichOneof("event") == "delta" for e in events[:-1])
    # Released chunk by chunk, a check at a time, not as one piece at the end.
    assert len(deltas) > 1 and len(deltas) <= -(-final.completion_tokens // 4)
    assert "".join(deltas) == final.text == plain.text  # greedy: the same answer
    assert not final.refused and final.output_moderation.prompt_tokens > 0
    assert final.released_tokens == final.completion_tokens == plain.completion_tokens


def test_a_flagging_check_ends_the_stream(stub: pb_grpc.ModerationServiceStub) -> None:
    request = pb.GenerateStreamRequest(
        messages=user("Tell me a story"), moderate_output=True, threshold=0.0,
        max_new_tokens=40, stream_check_tokens=3,
    )  # fmt: skip
    events = list(stub.GenerateStream(request, timeout=STREAM_DEADLINE_S))
    assert [e.WhichOneof("event") for e in events] == ["final"]  # the first check flagged
    final = events[0].final
    assert final.finish_reason == pb.FINISH_REASON_OUTPUT_FLAGGED and final.refused
    assert final.text == "" and final.output_moderation.flagged
    assert final.released_tokens == 0
    assert final.completion_tokens == 3  # generation stopped at the flagging check
    unary = stub.Generate(pb.GenerateRequest(
        messages=user("Tell me a story"), moderate_output=True, threshold=0.0,
        max_new_tokens=40, stream_check_tokens=3,
    ))  # fmt: skip
    assert unary.finish_reason == pb.FINISH_REASON_OUTPUT_FLAGGED
    assert unary.completion_tokens == 3 and unary.released_tokens == 0


def test_stream_check_tokens_is_validated(stub: pb_grpc.ModerationServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(messages=user("x"), moderate_output=True,
                                         stream_check_tokens=4097))  # fmt: skip
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert invalid_field(err.value) == "stream_check_tokens"
    with pytest.raises(grpc.RpcError) as stream_err:
        list(stub.GenerateStream(pb.GenerateStreamRequest(messages=user("x"),
                                                          stream_check_tokens=5000)))  # fmt: skip
    assert stream_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert invalid_field(stream_err.value) == "stream_check_tokens"


def test_model_info_describes_model_and_policies(stub: pb_grpc.ModerationServiceStub) -> None:
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.demo and "demo" in info.model
    assert info.attention_backend == "sdpa" and info.device == "cpu" and info.dtype == "float32"
    # CPU decodes eagerly (graphs are CUDA's default): no buckets, no capture time.
    assert not info.decode_graphs and not info.decode_graph_batch_sizes
    assert info.graph_capture_seconds == 0
    assert info.default_policy == "paper" and info.sliding_window == 32
    # --max-batch-size auto (the default) is 32 of each on CPU; the cache holds every slot.
    assert (info.generation_slots, info.scoring_slots) == (32, 32)
    assert info.kv_cache_bytes > 0 and info.kv_cache_bytes % 64 == 0
    # The CPU kernel choice measured at start-up, per matrix shape (fused q/k/v among them).
    if torch.backends.mkldnn.is_available():
        assert info.cpu_gemm.startswith("cpu gemm:") and "wqkv" in info.cpu_gemm
        assert info.cpu_gemm_measure_seconds >= 0
    policies = {p.name: p for p in info.policies}
    assert {"paper", "mistral-13"} <= set(policies)
    assert len(policies["mistral-13"].categories) == 13
    assert {c.paper_category for c in policies["mistral-13"].categories} == {
        "illegal_activities", "hateful_harassing_violent", "unqualified_advice",
    }  # fmt: skip


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.ClassifyRequest(text=""), "text"),
        (pb.ClassifyRequest(text="x" * 2001), "text"),
        (pb.ClassifyRequest(text="x", policy="no-such-policy"), "policy"),
        (pb.ClassifyRequest(text="x", role=7), "role"),  # type: ignore[arg-type]
        (pb.ClassifyRequest(text="x", threshold=1.5), "threshold"),
        (pb.ClassifyRequest(text="x", category_thresholds={"malware": 0.5}), "category_thresholds"),
        (pb.ClassifyRequest(text="x", prompt="context for an input?"), "prompt"),
    ],
)
def test_bad_classify_requests_are_invalid_argument_naming_the_field(
    stub: pb_grpc.ModerationServiceStub, request_: pb.ClassifyRequest, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Classify(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()
    assert invalid_field(err.value).startswith(field)
    assert stub.Classify(pb.ClassifyRequest(text="still serving")).model  # and it keeps serving


def test_the_request_id_comes_back_in_the_trailing_metadata(
    stub: pb_grpc.ModerationServiceStub,
) -> None:
    def request_id(call: Any) -> str:
        return dict(call.trailing_metadata())["x-request-id"]

    _, call = stub.Classify.with_call(
        pb.ClassifyRequest(text="hi"), metadata=(("x-request-id", "mine-1"),)
    )
    assert request_id(call) == "mine-1"
    _, call = stub.Classify.with_call(pb.ClassifyRequest(text="hi"))
    generated = request_id(call)
    assert len(generated) == 32 and generated != request_id(
        stub.Classify.with_call(pb.ClassifyRequest(text="hi"))[1]
    )
    # Errors keep it too, next to their rich details.
    with pytest.raises(grpc.RpcError) as err:
        stub.Classify(pb.ClassifyRequest(text=""), metadata=(("x-request-id", "mine-2"),))
    assert request_id(err.value) == "mine-2" and invalid_field(err.value) == "text"
    with pytest.raises(grpc.RpcError) as err:
        stub.Classify(
            pb.ClassifyRequest(text="x", policy="nope"), metadata=(("x-request-id", "m3"),)
        )
    assert request_id(err.value) == "m3"
    stream = stub.GenerateStream(
        pb.GenerateStreamRequest(messages=user("hi"), max_new_tokens=2),
        metadata=(("x-request-id", "mine-4"),),
    )
    list(stream)
    assert request_id(stream) == "mine-4"


def test_bad_batches_and_generations(stub: pb_grpc.ModerationServiceStub) -> None:
    cases: list[tuple[Any, Any, str]] = [
        (
            stub.ClassifyBatch,
            pb.ClassifyBatchRequest(requests=[pb.ClassifyRequest(text="a")] * 9),
            "requests",
        ),
        (stub.ClassifyBatch, pb.ClassifyBatchRequest(), "requests"),
        (
            stub.ClassifyBatch,
            pb.ClassifyBatchRequest(
                requests=[pb.ClassifyRequest(text="a"), pb.ClassifyRequest(text="")]
            ),
            "requests[1].text",
        ),
        (
            stub.Generate,
            pb.GenerateRequest(messages=user("x"), max_new_tokens=513),
            "max_new_tokens",
        ),
        (stub.Generate, pb.GenerateRequest(), "messages"),
        (
            stub.Generate,
            pb.GenerateRequest(messages=[pb.ChatMessage(role="robot", content="x")]),
            "messages[0].role",
        ),
        (stub.Generate, pb.GenerateRequest(messages=user("x"), temperature=-1), "temperature"),
        (
            stub.Generate,
            pb.GenerateRequest(messages=user("x"), moderate_input=True, policy="nope"),
            "policy",
        ),
    ]
    for method, request, field in cases:
        with pytest.raises(grpc.RpcError) as err:
            method(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert invalid_field(err.value) == field
    with pytest.raises(grpc.RpcError) as stream_err:
        list(stub.GenerateStream(pb.GenerateStreamRequest(messages=user("x"), top_p=2.0)))
    assert stream_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stub.Generate(
        pb.GenerateRequest(messages=user("ok"), max_new_tokens=2)
    ).completion_tokens


def test_a_request_over_the_message_size_limit_is_resource_exhausted(
    stub: pb_grpc.ModerationServiceStub,
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Classify(pb.ClassifyRequest(text="x" * 100_000))  # > max_message_bytes (64 KiB)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.Classify(pb.ClassifyRequest(text="still serving")).model


def test_a_full_queue_is_resource_exhausted(
    served: InProcessServer, stub: pb_grpc.ModerationServiceStub
) -> None:
    state = served.server.state
    real = state.worker
    runtime = served.server.runtime
    assert real is not None and runtime is not None
    # A worker that is not running holds its one queued job: the next request cannot queue.
    stalled = WorkerThread(runtime, max_queue=1)
    stalled.scheduler.submit(Job.classify([], reply=lambda _: None))
    state.worker = stalled
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(pb.ClassifyRequest(text="x"))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        state.worker = real
    assert stub.Classify(pb.ClassifyRequest(text="x")).model


# ------------------------------------------------------------ concurrency


def _passes(served: InProcessServer) -> tuple[float, float]:
    """(classifier passes, items classified) so far, from the server's metrics."""
    registry = served.server.metrics.registry
    labels = {"kind": "classify"}
    count = registry.get_sample_value("moderation_batch_size_count", labels) or 0.0
    return count, registry.get_sample_value("moderation_batch_size_sum", labels) or 0.0


def test_64_concurrent_calls_equal_the_sequential_answers(
    served: InProcessServer, stub: pb_grpc.ModerationServiceStub
) -> None:
    requests = [pb.ClassifyRequest(text=t) for t in TEXTS]
    sequential = [stub.Classify(r) for r in requests]
    passes, items = _passes(served)
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        concurrent_ = list(pool.map(stub.Classify, requests))
    assert len(concurrent_) == 64
    more_passes, more_items = _passes(served)
    assert more_items - items == 64
    assert more_passes - passes < 64  # callers shared classifier passes
    for a, b in zip(sequential, concurrent_, strict=True):
        assert a.category == b.category and a.flagged == b.flagged
        for key, value in a.scores.items():
            assert b.scores[key] == pytest.approx(value, abs=1e-5)


def _decode_steps(served: InProcessServer) -> tuple[float, float]:
    """(decoding steps, sequence-steps) so far: the generate batch sizes' count and sum."""
    registry = served.server.metrics.registry
    labels = {"kind": "generate"}
    count = registry.get_sample_value("moderation_batch_size_count", labels) or 0.0
    return count, registry.get_sample_value("moderation_batch_size_sum", labels) or 0.0


def test_concurrent_generations_are_batched_and_equal_alone(
    served: InProcessServer, stub: pb_grpc.ModerationServiceStub
) -> None:
    requests = [
        pb.GenerateRequest(messages=user(f"story {i}"), max_new_tokens=48) for i in range(6)
    ]
    alone = [stub.Generate(r).text for r in requests]
    steps, sequence_steps = _decode_steps(served)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        together = [r.text for r in pool.map(stub.Generate, requests)]
    assert together == alone
    more_steps, more_sequence_steps = _decode_steps(served)
    # Serially each step would decode one sequence; batched, steps decode several at once.
    assert more_steps - steps < more_sequence_steps - sequence_steps


def test_a_generation_whose_sampling_fails_errs_alone(
    served: InProcessServer, stub: pb_grpc.ModerationServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real engine's sampling of one sequence fails (its logits row turned NaN, as a
    numerical blow-up would) in a step it shares with another: that call gets INTERNAL saying
    so, the other gets the answer it gets alone, and the server carries on."""
    runtime = served.server.runtime
    assert runtime is not None
    engine = runtime.engine
    ok = pb.GenerateRequest(messages=user("a story"), max_new_tokens=24)
    # Long enough to be still running when the other call arrives: it fails once they share
    # a step.
    doomed = pb.GenerateRequest(messages=user("another story"), max_new_tokens=500)
    alone = stub.Generate(ok).text
    real_sample = engine.generation._sample
    doomed_running = threading.Event()
    poisoned_steps = []

    def sample(logits, seqs):  # type: ignore[no-untyped-def]
        doomed_rows = [i for i, s in enumerate(seqs) if s.request.max_new_tokens == 500]
        if doomed_rows and len(seqs) == 1:
            doomed_running.set()
            time.sleep(0.002)  # more margin for the other call to arrive
        elif doomed_rows:
            poisoned_steps.append(len(seqs))
            logits = logits.clone()
            logits[doomed_rows[0], 100] = float("nan")
        return real_sample(logits, seqs)

    monkeypatch.setattr(engine.generation, "_sample", sample)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        failing = pool.submit(stub.Generate, doomed)
        assert doomed_running.wait(10)
        answer = pool.submit(stub.Generate, ok)
        with pytest.raises(grpc.RpcError) as err:
            failing.result()
        assert answer.result().text == alone
    assert poisoned_steps == [2]  # it failed in a step shared with the other call
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "generation failed" in err.value.details() and "not finite" in err.value.details()
    assert _engine_idle(runtime)
    monkeypatch.undo()
    assert stub.Generate(ok).text == alone


def test_a_checked_answer_whose_sampling_fails_errs_and_frees_its_check_slot(
    served: InProcessServer, stub: pb_grpc.ModerationServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With output checks the answer holds a second slot (its checks): a sampling failure
    mid-answer fails the call with INTERNAL, sends no unchecked text, and frees both slots."""
    runtime = served.server.runtime
    assert runtime is not None
    engine = runtime.engine
    real_sample = engine.generation._sample
    steps = []

    def sample(logits, seqs):  # type: ignore[no-untyped-def]
        steps.append(len(seqs))
        if len(steps) == 20:  # after the first checks ran (every 4 tokens)
            logits = logits.clone()
            logits[0, 100] = float("nan")
        return real_sample(logits, seqs)

    monkeypatch.setattr(engine.generation, "_sample", sample)
    request = pb.GenerateStreamRequest(
        messages=user("a long story"), max_new_tokens=64, moderate_output=True,
        threshold=1.0, stream_check_tokens=4,
    )  # fmt: skip
    events = []
    with pytest.raises(grpc.RpcError) as err:
        for event in stub.GenerateStream(request):
            events.append(event)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "generation failed" in err.value.details()
    released = "".join(e.delta for e in events)
    assert all(e.HasField("delta") for e in events) and released  # checked chunks went out
    assert _engine_idle(runtime) and engine.open_streams == 0
    monkeypatch.undo()


def _engine_idle(runtime: Runtime, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not runtime.engine.has_unfinished():
            return True
        time.sleep(0.02)
    return False


def test_expired_deadline_and_cancelled_call_stop_costing(
    served: InProcessServer, stub: pb_grpc.ModerationServiceStub
) -> None:
    runtime = served.server.runtime
    assert runtime is not None
    long = pb.GenerateRequest(messages=user("go on forever"), max_new_tokens=500)
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(long, timeout=0.05)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _engine_idle(runtime)  # the sequence left the batch
    steps = runtime.engine.stats.forward_passes
    future = stub.Generate.future(long)
    time.sleep(0.05)
    future.cancel()
    assert _engine_idle(runtime)
    assert runtime.engine.stats.forward_passes - steps < 250  # far fewer than the 500 asked
    assert stub.Classify(pb.ClassifyRequest(text="after")).model


# ---------------------------------------------------------- metrics, logs


def test_metrics_are_scraped_over_http(
    served: InProcessServer, stub: pb_grpc.ModerationServiceStub
) -> None:
    stub.Classify(pb.ClassifyRequest(text="count me", policy="paper"))
    stub.Generate(pb.GenerateRequest(messages=user("x"), max_new_tokens=3))
    registry = served.server.metrics.registry
    stream_labels = {
        "grpc_type": "server_stream",
        "grpc_service": "moderation.v1.ModerationService",
        "grpc_method": "GenerateStream",
    }

    def stream_counts() -> list[float]:
        return [
            registry.get_sample_value("grpc_server_msg_sent_total", stream_labels) or 0.0,
            registry.get_sample_value("moderation_time_to_first_token_seconds_count") or 0.0,
            registry.get_sample_value("moderation_inter_token_latency_seconds_count") or 0.0,
        ]

    before = stream_counts()
    events = list(
        stub.GenerateStream(pb.GenerateStreamRequest(messages=user("y"), max_new_tokens=4))
    )
    deltas = sum(e.HasField("delta") for e in events)
    after = stream_counts()
    # Every event sent is counted; one time to first token, then one gap per further delta.
    assert deltas >= 1
    assert [a - b for a, b in zip(after, before, strict=True)] == [len(events), 1, deltas - 1]
    with pytest.raises(grpc.RpcError):
        stub.Classify(pb.ClassifyRequest(text=""))
    url = f"http://127.0.0.1:{served.settings.metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    svc = 'grpc_method="Classify",grpc_service="moderation.v1.ModerationService",grpc_type="unary"'
    for needle in (
        # grpc-ecosystem (go-grpc-prometheus) names and labels, Go's spelling of the codes
        f"grpc_server_started_total{{{svc}}}",
        f'grpc_server_handled_total{{grpc_code="OK",{svc}}}',
        f'grpc_server_handled_total{{grpc_code="InvalidArgument",{svc}}}',
        f'grpc_server_handling_seconds_bucket{{{svc},le="0.005"}}',
        f"grpc_server_msg_received_total{{{svc}}}",
        "moderation_time_to_first_token_seconds_bucket{",
        "moderation_inter_token_latency_seconds_bucket{",
        "moderation_build_info{",
        'moderation_model_info{demo="true",',
        "process_resident_memory_bytes ",
        "process_cpu_seconds_total ",
        "python_info{",
        "python_gc_collections_total{",
        "moderation_queue_depth ",
        "moderation_requests_in_flight ",
        "moderation_running_sequences ",
        'moderation_batch_size_count{kind="classify"}',
        'moderation_batch_size_count{kind="generate"}',
        'moderation_tokens_total{kind="prompt"}',
        'moderation_tokens_total{kind="completion"}',
        'moderation_tokens_total{kind="computed"}',
        "moderation_prefix_reuse_hits_total ",
        "moderation_prefix_reused_tokens_total ",
        "moderation_decisions_total{category=",
    ):
        assert needle in body, needle
    assert "_created" not in body  # one series per counter, not two


def test_request_log_lines_never_contain_the_text(
    served: InProcessServer, stub: pb_grpc.ModerationServiceStub, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("info")  # JSON lines on (the captured) stderr, as `moderation serve` does
    try:
        _check_request_log(served, stub, capsys)
    finally:
        structlog.reset_defaults()  # do not keep writing to this test's captured stderr


def _check_request_log(
    served: InProcessServer, stub: pb_grpc.ModerationServiceStub, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = "my very private message 12345"
    stub.Classify(pb.ClassifyRequest(text=secret), metadata=(("x-request-id", "req-42"),))
    err = capsys.readouterr().err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("request_id") == "req-42"]
    assert mine and mine[0]["method"] == "Classify" and mine[0]["code"] == "OK"
    assert {"latency_ms", "prompt_tokens", "category", "flagged", "timestamp"} <= set(mine[0])
    assert secret not in err
    # Failures get their line too, with a request id made up when the caller sent none.
    with pytest.raises(grpc.RpcError):
        stub.Classify(pb.ClassifyRequest(text=secret, policy="nope"))
    err = ""
    deadline = time.monotonic() + 5
    while '"INVALID_ARGUMENT"' not in err and time.monotonic() < deadline:
        time.sleep(0.01)  # the server logs once the call is over: maybe after the client knows
        err += capsys.readouterr().err
    failed = [json.loads(line) for line in err.splitlines() if '"INVALID_ARGUMENT"' in line]
    assert failed and failed[0]["request_id"] and failed[0]["error"].startswith("policy:")
    assert secret not in err
    # The operator can turn text logging on.
    state = served.server.state
    state.settings = dataclasses.replace(state.settings, log_text=True)
    try:
        stub.Classify(pb.ClassifyRequest(text=secret), metadata=(("x-request-id", "req-43"),))
        assert secret in capsys.readouterr().err
        # Concurrent calls each log their own facts (per-call context, no cross-talk).
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(
                pool.map(
                    lambda i: stub.Classify(
                        pb.ClassifyRequest(text=f"text {i}"), metadata=(("x-request-id", f"c{i}"),)
                    ),
                    range(16),
                )
            )
    finally:
        state.settings = dataclasses.replace(state.settings, log_text=False)
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    logged = {line["request_id"]: line["text"] for line in lines if line.get("method")}
    assert logged == {f"c{i}": f"text {i}" for i in range(16)}


@pytest.mark.parametrize(
    ("code", "level"),
    [
        (grpc.StatusCode.OK, "info"),
        (grpc.StatusCode.INVALID_ARGUMENT, "info"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "warning"),
        (grpc.StatusCode.UNAVAILABLE, "warning"),
        (grpc.StatusCode.INTERNAL, "error"),
    ],
)
def test_shed_and_refused_calls_are_logged_as_warnings(
    code: grpc.StatusCode, level: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from moderation.serving.grpc.interceptors import CallRecord, RequestTelemetry
    from moderation.serving.metrics import Metrics

    configure_logging("info")
    try:
        telemetry = RequestTelemetry(Metrics.create())
        telemetry.in_flight = 1
        telemetry._end(CallRecord("Classify", "r-1"), code)
    finally:
        structlog.reset_defaults()
    (line,) = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    assert (line["level"], line["code"]) == (level, code.name)
