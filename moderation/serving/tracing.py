"""OpenTelemetry tracing of a call's stages, optional (`--tracing`, the `tracing` extra).

One span per call (the RPC's name, over gRPC or HTTP), and under it one span per stage:
`plan` (validation and prompts, at the door), `queue` (waiting for the model's tick) and
`model` (from the tick that took it to its answer). The model runs in a process of its own:
it sends each answer's two durations with it, and the spans are placed back from the time the
answer arrived (the pipe's latency, well under a millisecond, is in neither). The call's
trace id goes into its log line (`trace_id`), so a log search finds the trace and back.

Off (the default) it costs nothing: OpenTelemetry is not imported, no span is made, the model
process measures nothing more, and every hook below returns at its first test. Spans go to the
global tracer provider: `opentelemetry-instrument moderation serve ...` (opentelemetry-distro
with an exporter, configured by the OTEL_* variables) sets one up. Without one, `enable` sets
the SDK's plain provider, which records spans (real trace ids in the log) and exports none.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Iterator
from typing import Any

TRACING_MODULES = ("opentelemetry",)
"""What the `tracing` extra provides (opentelemetry-api, opentelemetry-sdk)."""

_tracer: Any = None  # set by enable(): tracing is on in this process


def missing_tracing_modules() -> list[str]:
    return [m for m in TRACING_MODULES if importlib.util.find_spec(m) is None]


def enable() -> None:
    """Turn tracing on in this process (the server's, at start with --tracing)."""
    global _tracer
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(TracerProvider())  # none configured: ids, no export
    _tracer = trace.get_tracer("moderation")


def disable() -> None:
    global _tracer
    _tracer = None


def enabled() -> bool:
    return _tracer is not None


def begin(record: Any, name: str) -> None:
    """The call's span (ended by `end`); its trace id goes into the call's log line."""
    if _tracer is None:
        return
    from opentelemetry.trace import SpanKind

    span = _tracer.start_span(name, kind=SpanKind.SERVER)
    record.span = span
    context = span.get_span_context()
    if context.is_valid:
        record.fields["trace_id"] = format(context.trace_id, "032x")


def end(record: Any, code: str) -> None:
    span = getattr(record, "span", None)
    if span is None:
        return
    span.set_attribute("rpc.grpc.status_code_name", code)
    span.set_attribute("moderation.request_id", record.request_id)
    span.end()


def _child(record: Any, name: str, start_ns: int, end_ns: int) -> None:
    from opentelemetry import trace

    parent = trace.set_span_in_context(record.span)
    _tracer.start_span(name, context=parent, start_time=start_ns).end(end_time=end_ns)


@contextlib.contextmanager
def stage(record: Any, name: str) -> Iterator[None]:
    """A span for a stage run here (planning)."""
    if getattr(record, "span", None) is None or _tracer is None:
        yield
        return
    start = time.time_ns()
    try:
        yield
    finally:
        _child(record, name, start, time.time_ns())


def model_stages(record: Any, timing: tuple[float, float] | None) -> None:
    """The `queue` and `model` spans of an answer that just arrived, from the seconds the
    model process measured for each."""
    if timing is None or getattr(record, "span", None) is None or _tracer is None:
        return
    queued, in_model = timing
    now = time.time_ns()
    started = now - int(in_model * 1e9)
    _child(record, "queue", started - int(queued * 1e9), started)
    _child(record, "model", started, now)
