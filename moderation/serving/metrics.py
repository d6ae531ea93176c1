"""Prometheus metrics of the service, on a registry of its own (served on the metrics port).

A registry per server (not the global one) so that several servers in one process, as in the
tests, count separately, and the endpoint shows only what the service defines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from moderation.core.decision import Classification

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class WorkerMetrics(Protocol):
    """The metrics the scheduler updates (in the model process, a recorder of them)."""

    queue_depth: Any
    running_sequences: Any
    batch_size: Any
    tokens: Any
    prefix_hits: Any
    prefix_tokens: Any


WORKER_METRICS: tuple[str, ...] = tuple(WorkerMetrics.__annotations__)
"""The names of the scheduler's metrics, the one list of them."""


@dataclass
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    in_flight: Gauge
    queue_depth: Gauge
    running_sequences: Gauge
    batch_size: Histogram
    tokens: Counter
    prefix_hits: Counter
    prefix_tokens: Counter
    decisions: Counter
    undecodable: Counter
    model_stalled: Gauge

    @classmethod
    def create(cls) -> Metrics:
        r = CollectorRegistry()
        return cls(
            registry=r,
            requests=Counter(
                "moderation_requests", "RPCs by method and status code", ["method", "code"],
                registry=r,
            ),
            latency=Histogram(
                "moderation_request_latency_seconds", "RPC latency by method", ["method"],
                buckets=LATENCY_BUCKETS, registry=r,
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
                "sequences per decoding step)",
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
            model_stalled=Gauge(
                "moderation_model_stalled",
                "1 while the model makes no progress with work queued (health NOT_SERVING)",
                registry=r,
            ),
        )  # fmt: skip

    def record_decision(self, result: Classification) -> None:
        self.decisions.labels(
            policy=result.policy, category=result.category, flagged=str(result.flagged).lower()
        ).inc()

    def serve_http(self, port: int, host: str) -> Any:
        """Start the /metrics endpoint in a background thread; returns the HTTP server."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server
