"""Conversations as the jobs read them: a JSON list of {"role", "content"} messages, from a file
(`classify --messages`) or a CSV cell (`batch --messages-column`).

The JSON is read into `ChatMessage`s here (`core.chat.chat_messages` checks its shape), so that
a bad file or cell says what is wrong with it before anything is loaded or sent; the turn order
and the limits are the planner's (or the server's), as for any ClassifyRequest.messages.
"""

from __future__ import annotations

import json
from pathlib import Path

from moderation.core.chat import EXAMPLE, ChatMessage, chat_messages
from moderation.core.errors import InvalidArgument


def parse_messages(text: str) -> list[ChatMessage]:
    """The messages of a JSON conversation; InvalidArgument (field `messages`...) otherwise."""
    try:
        data = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, and numbers too large to read
        raise InvalidArgument("messages", f"not valid JSON ({exc}); expected {EXAMPLE}") from None
    return chat_messages(data)


def read_messages_file(path: str) -> list[ChatMessage]:
    """`parse_messages` of a file (UTF-8); an unreadable file is an InvalidArgument too."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument("messages", f"cannot read {path}: {exc}") from None
    return parse_messages(text)
