"""Loading the runtime a server serves: in this process, or in the model process."""

from __future__ import annotations

import time

import structlog

from moderation.runtime import Runtime, load
from moderation.serving.settings import ServeSettings

log = structlog.get_logger("moderation.serving.worker.loader")

MiB = 1 << 20


def load_from_settings(settings: ServeSettings) -> Runtime:
    """The runtime a server with these settings serves (the demo model without --model), the
    prefixes of its start-up policies pre-filled before the server reports SERVING."""
    runtime = load(settings.runtime_settings())
    start = time.perf_counter()
    warmed = runtime.classifier.warm_up()
    seconds = time.perf_counter() - start
    classifier, planner = runtime.classifier, runtime.planner
    later = [name for name in planner.policies if name not in warmed]
    # Each prefix costs its cache rows (128 KiB a token for the 7B in bf16), and none of them
    # is in the engine's memory plan: say what is held now, and what first uses may add.
    log.info(
        "policy prefixes pre-filled",
        policies=warmed,
        mib=round(classifier.prefix_cache_bytes / MiB, 1),
        seconds=round(seconds, 2),
        on_first_use=later,
        on_first_use_mib=round(
            sum(classifier.prefix_bytes(p) for p in planner.prefixes(later)) / MiB, 1
        ),
    )
    return runtime
