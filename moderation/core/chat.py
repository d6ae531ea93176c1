"""The turn order of a conversation, checked without the tokenizer or the engine (so the light
command line can check a conversation file before anything heavy is imported)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from moderation.core.errors import InvalidArgument, quote


def check_turn_order(
    messages: Sequence[Mapping[str, Any]], *, end: tuple[str, ...] = ("user",)
) -> None:
    """The order the API documents: an optional leading system message, then user and
    assistant messages alternating, starting with a user message and ending with one of `end`
    (a user message for generation; either for a conversation to classify)."""
    ending = " or ".join(end) + " message"
    if not messages:
        raise InvalidArgument("messages", f"must not be empty: end with a {ending}")
    roles = [m.get("role") if isinstance(m, Mapping) else None for m in messages]
    start = 1 if roles[:1] == ["system"] else 0
    for i in range(start, len(messages)):
        role = roles[i]
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if role != expected:
            raise InvalidArgument(
                f"messages[{i}].role",
                f"expected {expected!r}, got {quote(role)}: an optional system message first, "
                "then user and assistant messages alternating",
            )
    if roles[-1] not in end:
        raise InvalidArgument("messages", f"the conversation must end with a {ending}")
