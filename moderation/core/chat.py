"""A chat message, and the one validation of a conversation that Classify and Generate share.

Checked without the tokenizer or the engine, so the light command line can check a
conversation file before anything heavy is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from moderation.core.errors import InvalidArgument, quote
from moderation.core.text_safety import is_blank

EXAMPLE = '[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]'


@dataclass(frozen=True)
class ChatMessage:
    """One message of a conversation: its role ("system", "user" or "assistant") and text."""

    role: str
    content: str


def check_conversation(
    messages: Sequence[ChatMessage], *, end: tuple[str, ...] = ("user",)
) -> None:
    """The order the API documents, for Classify and Generate alike: an optional leading
    system message, then user and assistant messages alternating, starting with a user message
    and ending with one of `end` (a user message for generation; either for a conversation to
    classify). The last message and every assistant message must not be empty: an empty turn
    is not a conversation the model was trained on (mistral-common refuses an empty assistant
    message), whichever RPC brings it."""
    ending = " or ".join(end) + " message"
    if not messages:
        raise InvalidArgument("messages", f"must not be empty: end with a {ending}")
    start = 1 if messages[0].role == "system" else 0
    for i in range(start, len(messages)):
        role = messages[i].role
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if role != expected:
            raise InvalidArgument(
                f"messages[{i}].role",
                f"expected {expected!r}, got {quote(role)}: an optional system message first, "
                "then user and assistant messages alternating",
            )
    last = len(messages) - 1
    if messages[last].role not in end:
        raise InvalidArgument("messages", f"the conversation must end with a {ending}")
    for i, message in enumerate(messages):
        if (i == last or message.role == "assistant") and is_blank(message.content):
            raise InvalidArgument(f"messages[{i}].content", "must not be empty")


def chat_messages(
    value: Any,
    where: str = "messages",
    *,
    content: Callable[[Any, str], str] | None = None,
) -> list[ChatMessage]:
    """Typed messages from decoded JSON: a list of objects with a string role and content.
    InvalidArgument names the bad part (`where[i].role`...). `content` reads a content that is
    not a plain string (Mistral's text chunks); by default it must be a string."""
    if not isinstance(value, list):
        raise InvalidArgument(
            where, f"expected a JSON list of messages, got a {_kind(value)}: {EXAMPLE}"
        )
    out: list[ChatMessage] = []
    for i, message in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(message, dict):
            raise InvalidArgument(
                at, f"expected an object with role and content, got a {_kind(message)}"
            )
        role = message.get("role")
        if not isinstance(role, str):
            raise InvalidArgument(f"{at}.role", "must be a string")
        text = message.get("content")
        if content is not None:
            text = content(text, f"{at}.content")
        elif not isinstance(text, str):
            raise InvalidArgument(f"{at}.content", "must be a string")
        out.append(ChatMessage(role, text))
    return out


def _kind(value: object) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean"}.get(
        type(value), "number" if isinstance(value, int | float) else "null"
    )
