"""Loading the runtime a server serves: in this process, or in the model process."""

from __future__ import annotations

from moderation.runtime import Runtime, load
from moderation.serving.settings import ServeSettings


def load_from_settings(settings: ServeSettings) -> Runtime:
    """The runtime a server with these settings serves (the demo model without --model), its
    policy prefixes pre-filled before the server reports SERVING."""
    runtime = load(settings.runtime_settings())
    runtime.classifier.warm_up()
    return runtime
