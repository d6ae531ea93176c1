"""Guard an OpenAI-SDK stream of chat chunks with ModerateStream: only checked text comes out.

    stream = openai.chat.completions.create(model=..., messages=messages, stream=True)
    guarded = guard_openai_stream(client, stream, messages=messages)
    for text in guarded:          # checked, releasable text only
        print(text, end="")
    if guarded.flagged:           # stopped: hide what was shown
        print(guarded.verdict.result.category)

Like the client it imports only grpc, protobuf and the stubs (through the client): any object
shaped like the SDK's `ChatCompletionChunk` works (`chunk.choices[i].delta.content`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from moderation.api.client import Message, ModerationClient
from moderation.v1 import moderation_pb2 as pb


def chunk_texts(chunks: Iterable[Any], choice: int = 0) -> Iterator[str]:
    """The text deltas of one choice of a stream of OpenAI chat completion chunks (role-only,
    tool-call and empty chunks carry none)."""
    for chunk in chunks:
        for c in getattr(chunk, "choices", None) or ():
            if getattr(c, "index", 0) != choice:
                continue
            content = getattr(getattr(c, "delta", None), "content", None)
            if content:
                yield content


class GuardedText:
    """The checked, released text of a streamed answer, piece by piece (see the module doc).

    Iterating reads the LLM's chunks as ModerateStream takes them and yields the text each
    verdict releases; it stops at a flagged verdict (`flagged`, `verdict`) or once the whole
    answer is checked (`complete`). `text` is what was released."""

    def __init__(
        self,
        client: ModerationClient,
        chunks: Iterable[Any],
        *,
        prompt: str | None = None,
        messages: Sequence[Message] | None = None,
        choice: int = 0,
        **options: Any,
    ):
        self.client = client
        self.chunks = chunks
        self.prompt = prompt
        self.messages = messages
        self.choice = choice
        self.options: Mapping[str, Any] = options  # policy, threshold, check_tokens, timeout
        self.received: list[str] = []
        self.text = ""
        self.verdict: pb.ModerateStreamResponse | None = None

    @property
    def flagged(self) -> bool:
        return self.verdict is not None and self.verdict.result.flagged

    @property
    def complete(self) -> bool:
        return self.verdict is not None and self.verdict.complete

    def _deltas(self) -> Iterator[str]:
        for text in chunk_texts(self.chunks, self.choice):
            self.received.append(text)
            yield text

    def __iter__(self) -> Iterator[str]:
        verdicts = self.client.moderate_stream(
            self._deltas(), prompt=self.prompt, messages=self.messages, **self.options
        )
        for verdict in verdicts:
            self.verdict = verdict
            if verdict.result.flagged:
                return
            whole = "".join(self.received)  # the reader thread appends only; a copy suffices
            released = whole[len(self.text) : verdict.released_chars]
            if released:
                self.text += released
                yield released


def guard_openai_stream(
    client: ModerationClient,
    chunks: Iterable[Any],
    *,
    prompt: str | None = None,
    messages: Sequence[Message] | None = None,
    **options: Any,
) -> GuardedText:
    """Wrap an OpenAI-SDK chat completion stream: iterate the result for checked text."""
    return GuardedText(client, chunks, prompt=prompt, messages=messages, **options)
