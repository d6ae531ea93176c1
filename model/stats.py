"""What the engine counts, for the service's metrics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    """Counters the service exports as metrics."""

    forward_passes: int = 0
    tokens_computed: int = 0
    prefix_tokens_reused: int = 0
