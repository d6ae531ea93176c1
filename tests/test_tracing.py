"""`serve --tracing`: OpenTelemetry spans of a call and its stages (plan, queue, model: the
last two measured in the model process), the trace id in the call's log line; nothing at all
when off. Real server, real model process."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from structlog.testing import capture_logs

from moderation.cli import main
from moderation.exit_codes import EXIT_USAGE
from moderation.serving import tracing
from moderation.serving.logs import configure_logging
from moderation.serving.settings import ServeSettings
from moderation.serving.worker.job import Job
from moderation.serving.worker.model_child import answer_timing
from moderation.v1 import moderation_pb2 as pb
from moderation.v1 import moderation_pb2_grpc as pb_grpc
from tests.servers import InProcessServer, demo_loader, free_port

CLASSIFY = "moderation.v1.ModerationService/Classify"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()  # its processor stays on the provider, exporting nothing more
    tracing.disable()


def _settings(checkpoint: Path, **overrides: object) -> ServeSettings:
    return dataclasses.replace(
        ServeSettings(), model=str(checkpoint), host="127.0.0.1", port=free_port(),
        metrics_port=0, device="cpu", dtype="float32", **overrides,
    )  # fmt: skip


@pytest.mark.parametrize("model_process", [True, False], ids=["model-process", "thread"])
def test_a_call_and_its_stages_are_spans_with_the_trace_id_in_the_log(
    demo_checkpoint: Path, spans: InMemorySpanExporter, model_process: bool
) -> None:
    configure_logging("info")
    settings = _settings(demo_checkpoint, tracing=True, model_process=model_process)
    loader = {} if model_process else {"loader": demo_loader(demo_checkpoint)}
    server = InProcessServer(settings, **loader)
    try:
        server.wait_loaded()
        stub = pb_grpc.ModerationServiceStub(grpc.insecure_channel(server.address))
        with capture_logs() as logs:
            stub.Classify(pb.ClassifyRequest(text="trace me"))
            chat = pb.GenerateRequest(
                messages=[pb.ChatMessage(role="user", content="hi")], max_new_tokens=3
            )
            stub.Generate(chat)
    finally:
        server.stop()
    finished = spans.get_finished_spans()
    (call,) = [s for s in finished if s.name == CLASSIFY]
    children = {s.name: s for s in finished if s.parent is not None
                and s.parent.span_id == call.context.span_id}  # fmt: skip
    assert set(children) == {"plan", "queue", "model"}
    plan, queue, model = children["plan"], children["queue"], children["model"]
    assert call.start_time <= plan.start_time <= plan.end_time <= queue.start_time
    assert queue.end_time == model.start_time <= model.end_time <= call.end_time
    (line,) = [e for e in logs if e.get("method") == "Classify"]
    assert line["trace_id"] == format(call.context.trace_id, "032x")
    generate = [s for s in finished if s.name.endswith("/Generate")]
    assert generate and {"model"} <= {
        s.name for s in finished if s.parent and s.parent.span_id == generate[0].context.span_id
    }


def test_off_nothing_is_traced_or_measured(
    demo_checkpoint: Path, spans: InMemorySpanExporter
) -> None:
    configure_logging("info")
    # In the server's process (quicker to start); the model process's side is the _Sink below.
    settings = _settings(demo_checkpoint, model_process=False)
    server = InProcessServer(settings, demo_loader(demo_checkpoint))
    try:
        server.wait_loaded()
        stub = pb_grpc.ModerationServiceStub(grpc.insecure_channel(server.address))
        with capture_logs() as logs:
            stub.Classify(pb.ClassifyRequest(text="no trace"))
    finally:
        server.stop()
    assert spans.get_finished_spans() == ()
    assert not tracing.enabled()
    assert all("trace_id" not in e for e in logs)
    job = Job.classify([], reply=lambda _: None)
    job.started_at = 1.0
    assert answer_timing(job, timed=False) is None  # the model process measures nothing more
    assert answer_timing(job, timed=True) is not None


def test_tracing_without_the_extra_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr("moderation.serving.tracing.missing_tracing_modules",
                        lambda: ["opentelemetry"])  # fmt: skip
    assert main(["serve", "--tracing", "--model", str(tmp_path / "none")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "needs the tracing extra" in err and "pip install '.[tracing]'" in err
