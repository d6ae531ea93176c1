"""The count limits of a request, checked before anything parses or walks its items.

Both transports refuse a body whose counts are past the server's limits before building it:
the HTTP listener on the decoded JSON (`moderation.serving.http.bodies`), gRPC on the protobuf
bytes (`moderation.serving.grpc.wire`). Protobuf's parser holds the GIL for the whole message
(1.3 M empty batch items: 156 ms), so counting first is what keeps the event loop answering.
"""

from __future__ import annotations

from dataclasses import dataclass

from moderation.serving.settings import ServeSettings

VALUES_PER_MESSAGE = 8  # a message object: role, content, a few text chunks
VALUES_PER_ITEM = 64  # a request's scalar fields and its category thresholds

COUNTED = {"requests": "max_items", "messages": "max_messages"}
"""The repeated fields with a count limit, by proto field name (the servicer's own limits)."""
SETTING_NAMES = {
    "max_items": "MODERATION_MAX_BATCH_ITEMS",
    "max_messages": "MODERATION_MAX_MESSAGES",
}


@dataclass(frozen=True)
class Limits:
    """The count limits of the server (MODERATION_MAX_BATCH_ITEMS, MODERATION_MAX_MESSAGES)."""

    max_items: int
    max_messages: int

    @classmethod
    def of(cls, settings: ServeSettings) -> Limits:
        return cls(settings.max_batch_items, settings.max_messages)

    @property
    def item_values(self) -> int:
        """The most values (JSON values, protobuf fields) one valid request item holds."""
        return self.max_messages * VALUES_PER_MESSAGE + VALUES_PER_ITEM

    def values(self, *, batch: bool) -> int:
        """The most values a valid body holds: one item's, or a batch of them."""
        return self.item_values * (self.max_items if batch else 1) + VALUES_PER_ITEM

    def over(self, field: str, count: int, kind: str) -> str | None:
        """The message for `count` entries of `field` past its limit (`kind`: max_items or
        max_messages), or None when within it; the servicer says the same."""
        limit: int = getattr(self, kind)
        if count <= limit:
            return None
        noun = "messages" if kind == "max_messages" else "items"
        return f"{count} {noun} exceed the limit of {limit} ({SETTING_NAMES[kind]})"
