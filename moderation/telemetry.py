"""Prometheus metrics of the service, on a registry of its own (served on the metrics port)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    queue_depth: Gauge
    running_sequences: Gauge
    batch_size: Histogram
    tokens: Counter
    prefix_hits: Counter
    decisions: Counter

    @classmethod
    def create(cls) -> Metrics:
        r = CollectorRegistry()
        return cls(
            registry=r,
            requests=Counter(
                "moderation_requests",
                "RPCs by method and status code",
                ["method", "code"],
                registry=r,
            ),
            latency=Histogram(
                "moderation_request_latency_seconds",
                "RPC latency by method",
                ["method"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            queue_depth=Gauge(
                "moderation_queue_depth", "Requests waiting for the model worker", registry=r
            ),
            running_sequences=Gauge(
                "moderation_running_sequences", "Generations in the engine's batch", registry=r
            ),
            batch_size=Histogram(
                "moderation_batch_size",
                "Items per engine pass (classify: texts per classifier pass; generate: "
                "sequences per step)",
                ["kind"],
                buckets=BATCH_BUCKETS,
                registry=r,
            ),
            tokens=Counter(
                "moderation_tokens",
                "Tokens processed (prompt, completion: per request; computed: by the engine)",
                ["kind"],
                registry=r,
            ),
            prefix_hits=Counter(
                "moderation_prefix_reuse_hits",
                "Classifications that reused a pre-filled policy prefix",
                registry=r,
            ),
            decisions=Counter(
                "moderation_decisions",
                "Classifications by policy, category and flagged",
                ["policy", "category", "flagged"],
                registry=r,
            ),
        )
