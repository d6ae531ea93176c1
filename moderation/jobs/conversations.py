"""Conversations as the jobs read them: a JSON list of {"role", "content"} messages, from a file
(`classify --messages`) or a CSV cell (`batch --messages-column`).

Only the shape is checked here (a list of objects with string role and content), so that a bad
file or cell says what is wrong with it before anything is loaded or sent; the turn order and
the limits are the planner's (or the server's), as for any ClassifyRequest.messages.
"""

from __future__ import annotations

import json
from pathlib import Path

from moderation.core.errors import InvalidArgument

EXAMPLE = '[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]'


def parse_messages(text: str) -> list[dict[str, str]]:
    """The messages of a JSON conversation; InvalidArgument (field `messages`...) otherwise."""
    try:
        data = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, and numbers too large to read
        raise InvalidArgument("messages", f"not valid JSON ({exc}); expected {EXAMPLE}") from None
    if not isinstance(data, list):
        raise InvalidArgument(
            "messages", f"expected a JSON list of messages, got a {_kind(data)}: {EXAMPLE}"
        )
    out: list[dict[str, str]] = []
    for i, message in enumerate(data):
        if not isinstance(message, dict):
            raise InvalidArgument(
                f"messages[{i}]",
                f"expected an object with role and content, got a {_kind(message)}",
            )
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise InvalidArgument(f"messages[{i}].{key}", "must be a string")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def read_messages_file(path: str) -> list[dict[str, str]]:
    """`parse_messages` of a file (UTF-8); an unreadable file is an InvalidArgument too."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument("messages", f"cannot read {path}: {exc}") from None
    return parse_messages(text)


def _kind(value: object) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean"}.get(
        type(value), "number" if isinstance(value, int | float) else "null"
    )
