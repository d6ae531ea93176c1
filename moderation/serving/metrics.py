"""Prometheus metrics of the service, on a registry of its own (served on the metrics port).

A registry per server (not the global one) so that several servers in one process, as in the
tests, count separately, and the endpoint shows only what the service defines, plus the
standard `process_*` and `python_*` collectors.

RPCs are counted under the names of grpc-ecosystem's go-grpc-prometheus (and the Python and
Java ports), so that the usual gRPC dashboards and alerts work unchanged:
`grpc_server_started_total`, `grpc_server_handled_total{grpc_code}`,
`grpc_server_msg_received_total`, `grpc_server_msg_sent_total` and the histogram
`grpc_server_handling_seconds`, labelled `grpc_type` (unary, server_stream), `grpc_service`
and `grpc_method`; `grpc_code` is the Go spelling (OK, InvalidArgument, ResourceExhausted...).
`*_created` series are not exported (prometheus-client's `disable_created_metrics`): they
double the series count and no dashboard reads them.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Protocol

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

from moderation.core.decision import Classification
from moderation.core.thresholds import LiveThresholds

disable_created_metrics()

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5,
                 0.75, 1.0, 2.5, 5.0, 10.0)  # fmt: skip
GRPC_LABELS = ["grpc_type", "grpc_service", "grpc_method"]


def go_code(name: str) -> str:
    """A status code as Go and go-grpc-prometheus spell it: INVALID_ARGUMENT -> InvalidArgument."""
    return "OK" if name == "OK" else "".join(w.capitalize() for w in name.split("_"))


def version_of(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class WorkerMetrics(Protocol):
    """The metrics the scheduler updates (in the model process, a recorder of them)."""

    queue_depth: Any
    running_sequences: Any
    batch_size: Any
    tokens: Any
    prefix_hits: Any
    prefix_tokens: Any
    queue_wait: Any
    model_seconds: Any
    step_seconds: Any
    kv_cache_slots_in_use: Any
    kv_cache_tokens_in_use: Any
    kv_cache_slots: Any
    kv_cache_tokens: Any


WORKER_METRICS: tuple[str, ...] = tuple(WorkerMetrics.__annotations__)
"""The names of the scheduler's metrics, the one list of them."""


@dataclass
class Metrics:
    registry: CollectorRegistry
    started: Counter
    handled: Counter
    handling_seconds: Histogram
    msg_received: Counter
    msg_sent: Counter
    time_to_first_token: Histogram
    inter_token_latency: Histogram
    build_info: Gauge
    model_info: Gauge
    in_flight: Gauge
    queue_depth: Gauge
    running_sequences: Gauge
    batch_size: Histogram
    tokens: Counter
    prefix_hits: Counter
    prefix_tokens: Counter
    decisions: Counter
    undecodable: Counter
    stream_limit_reached: Counter
    model_stalled: Gauge
    threshold: Gauge
    queue_wait: Histogram
    model_seconds: Histogram
    step_seconds: Histogram
    kv_cache_slots_in_use: Gauge
    kv_cache_tokens_in_use: Gauge
    kv_cache_slots: Gauge
    kv_cache_tokens: Gauge

    @classmethod
    def create(cls) -> Metrics:
        r = CollectorRegistry()
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(collector)  # process_* (CPU, memory, fds) and python_* (version, GC)
        build_info = Gauge(
            "moderation_build_info",
            "Versions of the server and its main libraries (always 1)",
            ["version", "python", "torch", "grpcio"],
            registry=r,
        )
        build_info.labels(
            version=version_of("mistral-moderation"),
            python=platform.python_version(),
            torch=version_of("torch"),
            grpcio=version_of("grpcio"),
        ).set(1)
        return cls(
            registry=r,
            started=Counter(
                "grpc_server_started", "Total number of RPCs started on the server.",
                GRPC_LABELS, registry=r,
            ),
            handled=Counter(
                "grpc_server_handled",
                "Total number of RPCs completed on the server, regardless of success or failure.",
                [*GRPC_LABELS, "grpc_code"], registry=r,
            ),
            handling_seconds=Histogram(
                "grpc_server_handling_seconds",
                "Histogram of response latency (seconds) of gRPC that had been "
                "application-level handled by the server.",
                GRPC_LABELS, buckets=LATENCY_BUCKETS, registry=r,
            ),
            msg_received=Counter(
                "grpc_server_msg_received", "Total number of RPC stream messages received on "
                "the server.", GRPC_LABELS, registry=r,
            ),
            msg_sent=Counter(
                "grpc_server_msg_sent", "Total number of gRPC stream messages sent by the "
                "server.", GRPC_LABELS, registry=r,
            ),
            time_to_first_token=Histogram(
                "moderation_time_to_first_token_seconds",
                "GenerateStream: seconds from the call's start to its first text delta",
                buckets=LATENCY_BUCKETS, registry=r,
            ),
            inter_token_latency=Histogram(
                "moderation_inter_token_latency_seconds",
                "GenerateStream: seconds between consecutive text deltas (a delta is usually "
                "one token)", buckets=TOKEN_BUCKETS, registry=r,
            ),
            build_info=build_info,
            model_info=Gauge(
                "moderation_model_info", "The model being served (1 once loaded)",
                ["model", "demo", "device", "dtype"], registry=r,
            ),
            in_flight=Gauge(
                "moderation_requests_in_flight", "ModerationService RPCs being handled",
                registry=r,
            ),
            queue_depth=Gauge(
                "moderation_queue_depth",
                "Requests waiting for the model (worker queue and engine admission)",
                registry=r,
            ),
            running_sequences=Gauge(
                "moderation_running_sequences", "Generations in the engine's batch", registry=r
            ),
            batch_size=Histogram(
                "moderation_batch_size",
                "Items per engine pass (classify: texts per classifier pass; generate: "
                "sequences per decoding step; stream_check: answers per output check pass; "
                "answer_check: ModerateStream checks per pass)",
                ["kind"], buckets=BATCH_BUCKETS, registry=r,
            ),
            tokens=Counter(
                "moderation_tokens",
                "Tokens processed (prompt, completion: per request; computed: by the engine)",
                ["kind"], registry=r,
            ),
            prefix_hits=Counter(
                "moderation_prefix_reuse_hits",
                "Classifications that reused a pre-filled policy prefix", registry=r,
            ),
            prefix_tokens=Counter(
                "moderation_prefix_reused_tokens",
                "Prompt tokens not computed thanks to pre-filled policy prefixes", registry=r,
            ),
            decisions=Counter(
                "moderation_decisions", "Classifications by policy, category and flagged",
                ["policy", "category", "flagged"], registry=r,
            ),
            undecodable=Counter(
                "moderation_undecodable_requests",
                "Request bodies that were not a valid message (answered INVALID_ARGUMENT)",
                registry=r,
            ),
            stream_limit_reached=Counter(
                "moderation_grpc_connection_stream_limit_reached",
                "Times a gRPC connection reached --max-concurrent-streams calls in flight (its "
                "next calls wait in the client or are refused with REFUSED_STREAM)", registry=r,
            ),
            model_stalled=Gauge(
                "moderation_model_stalled",
                "1 while the model makes no progress with work queued (health NOT_SERVING)",
                registry=r,
            ),
            threshold=Gauge(
                "moderation_threshold",
                "Thresholds applied to requests that set none, per policy: category "
                '"unsafe" is the threshold on P(not acceptable), other categories their '
                "own thresholds (from a thresholds file); source: the file or "
                "MODERATION_THRESHOLD", ["policy", "category", "source"], registry=r,
            ),
            queue_wait=Histogram(
                "moderation_queue_wait_seconds",
                "Seconds a request waited in the model's queue before a tick took it",
                buckets=LATENCY_BUCKETS, registry=r,
            ),
            model_seconds=Histogram(
                "moderation_model_seconds",
                "Seconds from the tick that took a request to its answer (kind: classify, "
                "generate)", ["kind"], buckets=LATENCY_BUCKETS, registry=r,
            ),
            step_seconds=Histogram(
                "moderation_step_seconds",
                "Seconds per scheduler tick: its classifier pass and one engine step",
                buckets=STEP_BUCKETS, registry=r,
            ),
            kv_cache_slots_in_use=Gauge(
                "moderation_kv_cache_slots_in_use",
                "Generation slots of the KV cache holding a sequence (an answer or its checks)",
                registry=r,
            ),
            kv_cache_tokens_in_use=Gauge(
                "moderation_kv_cache_tokens_in_use",
                "Tokens held in the generation slots of the KV cache", registry=r,
            ),
            kv_cache_slots=Gauge(
                "moderation_kv_cache_slots", "Generation slots of the KV cache", registry=r
            ),
            kv_cache_tokens=Gauge(
                "moderation_kv_cache_tokens",
                "Tokens the generation slots of the KV cache can hold (slots x window)",
                registry=r,
            ),
        )  # fmt: skip

    def record_model(self, model: str, *, demo: bool, device: str, dtype: str) -> None:
        self.model_info.labels(model=model, demo=str(demo).lower(), device=device, dtype=dtype).set(
            1
        )

    def watch_model_process(self, pid: int) -> None:
        """`moderation_model_process_*`: the model process's CPU, memory and file descriptors,
        read from /proc/PID here. Read by this process rather than sent by the child: it costs
        the model nothing, and it still answers while the model is busy or hung (when its
        memory matters most). Gone with the process (no samples)."""
        ProcessCollector(namespace="moderation_model", pid=lambda: pid, registry=self.registry)

    def record_thresholds(self, live: LiveThresholds) -> None:
        """The live thresholds of one policy (its per-category ones replace the overall one,
        which is then not exported: it decides nothing)."""
        if not live.category_thresholds:
            self.threshold.labels(live.policy, "unsafe", live.source).set(live.threshold)
        for category, value in live.category_thresholds.items():
            self.threshold.labels(live.policy, category, live.source).set(value)

    def record_start(self, grpc_type: str, service: str, method: str) -> None:
        self.started.labels(grpc_type, service, method).inc()
        self.msg_received.labels(grpc_type, service, method).inc()  # one request message

    def record_end(
        self, grpc_type: str, service: str, method: str, code: str, seconds: float
    ) -> None:
        self.handled.labels(grpc_type, service, method, go_code(code)).inc()
        self.handling_seconds.labels(grpc_type, service, method).observe(seconds)

    def record_decision(self, result: Classification) -> None:
        self.decisions.labels(
            policy=result.policy, category=result.category, flagged=str(result.flagged).lower()
        ).inc()

    def serve_http(self, port: int, host: str) -> Any:
        """Start the /metrics endpoint in a background thread; returns the HTTP server."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server
