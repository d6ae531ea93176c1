"""`POST /v1/chat/completions`: OpenAI's chat completions, answered by the servicer's Generate
(a `chat.completion`) or GenerateStream (`stream: true`: server-sent events, one
`data: {chat.completion.chunk}` per event and `data: [DONE]` at the end).

The request goes the way of every other route: the listener's middleware (token, request id,
log line, metrics), its body reader (size limit), its one deadline (`exchange`: the
`grpc-timeout` covers the whole request; each of its calls, GetModelInfo, the scoring
Classify calls and the generation, gets what the ones before it left), the servicer's checks
(limits, roles, ranges: the errors name the request's fields), the same worker.

Moderation (OpenAI's `moderation` parameter, or this server's `moderate_input` /
`moderate_output`) is reported under `moderation: {"input", "output"}` in OpenAI's shape: the
blocking sides from GenerateResponse's input_moderation / output_moderation, the scored-only
sides from a Classify of the conversation (input, before generating) and of the conversation
with the answer (output, after it); a side that did not run is null.

A stream opens on the servicer's first event, so an error before it (a bad field, a full queue,
loading) is an ordinary error answer with its HTTP status. Chunks: the assistant's role first,
then the text as it is released (with `moderate_output`, after each check), then a chunk with
`finish_reason` and, beside it, `moderation` (what input and output moderation said); with
`stream_options.include_usage` a last chunk with `usage` and no choices. An error after the first
chunk is a `data: {"error": ...}` event (the SDKs raise it) before `data: [DONE]`.

The deadline once a stream has started is what a gRPC deadline is to GenerateStream: it still
covers the whole call. When it passes, the generation stops (the worker drops it) and the
stream ends with a DEADLINE_EXCEEDED error event and `data: [DONE]`, after the text already
sent (the 200 is sent too); scoring the answer after it gets only what is left, and fails the
same way when nothing is.

Stop sequences are applied here, on the text: the answer ends before the first one
(`finish_reason` "stop"); generation itself runs to its end, so `usage` counts every token
generated and blocking moderation checks them all (a scored output is the text returned). The
streamed text holds back only what could begin a stop sequence.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, cast

import grpc
from aiohttp import web
from google.protobuf.message import Message

from moderation.core.errors import quote
from moderation.serving.calls import REQUEST_ID_KEY
from moderation.serving.http import exchange as http_exchange
from moderation.serving.http.chat import (
    Answer,
    ChatRequest,
    StopScanner,
    cut_at_stop,
    moderation_results,
    read_request,
    rename,
)
from moderation.serving.http.compat import openai_error, select_policy
from moderation.serving.http.names import OPENAI_POLICY, ServedNames
from moderation.serving.http.status import CallError
from moderation.v1 import moderation_pb2 as pb

PATH = "/v1/chat/completions"
EVENT_STREAM = "text/event-stream"
DONE = b"data: [DONE]\n\n"

ReadJson = Callable[[web.Request], Awaitable[Any]]
# The listener's servicer calls, each within what is left of the request's deadline.
CallRpc = Callable[[str, Message], Awaitable[Any]]
OnEvent = Callable[[Any], Awaitable[None]]
RunStream = Callable[[str, Message, OnEvent], Awaitable["CallError | None"]]
ErrorAnswer = Callable[[web.Request, CallError], web.Response]


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def _renamed(exc: CallError, chat: ChatRequest) -> CallError:
    """The servicer's error in the names of the chat request (max_new_tokens -> max_tokens)."""
    if exc.field is None:
        return exc
    field = rename(exc.field, chat.names)
    message = exc.message
    if message.startswith(exc.field):
        message = field + message[len(exc.field) :]
    return CallError(exc.code, message, field, exc.http_status)


class ChatCompletions:
    """The route, with the listener's own pieces: its body reader, servicer calls (within the
    request's deadline) and error answers."""

    def __init__(
        self,
        names: ServedNames,
        read_json: ReadJson,
        call: CallRpc,
        run_stream: RunStream,
        error: ErrorAnswer,
    ):
        self.names = names
        self.read_json = read_json
        self.call = call
        self.run_stream = run_stream
        self.error = error

    async def handle(self, request: web.Request) -> web.StreamResponse:
        exchange = http_exchange.current()
        exchange.rpc = "Generate"
        try:
            async with http_exchange.within():  # reading and parsing count against it too
                chat = read_request(await self.read_json(request))
            exchange.rpc = "GenerateStream" if chat.stream else "Generate"
            # Each call below gets what the ones before it left of the deadline (`self.call`).
            info = await self.call("GetModelInfo", pb.GetModelInfoRequest())
            if not self.names.serves(chat.model, info.model):
                served = ", ".join(self.names.names(info.model))
                raise CallError(
                    grpc.StatusCode.NOT_FOUND,
                    f"The model {quote(chat.model)} does not exist: this server generates as "
                    f"{served}",
                    "model",
                )
            answer = Answer.new(http_exchange.request_id(), self.names.primary(info.model))
            report = Report(self, chat, info, self.names)
            await report.score_input()
            if not chat.stream:
                try:
                    response = await self.call("Generate", chat.generation)
                except CallError as exc:
                    raise _renamed(exc, chat) from exc
                text = cut_at_stop(response.text, chat.stop)[0]
                moderation = await report.finish(response, text)
                return web.json_response(answer.completion(response, chat.stop, moderation))
        except CallError as exc:
            return self.error(request, exc)
        return await self._stream(request, chat, answer, report)

    async def _stream(
        self,
        request: web.Request,
        chat: ChatRequest,
        answer: Answer,
        report: Report,
    ) -> web.StreamResponse:
        scanner = StopScanner(chat.stop)
        sent: list[str] = []  # the answer as the caller got it, for a scored output
        opened: web.StreamResponse | None = None
        final: pb.GenerateResponse | None = None

        async def open_stream() -> web.StreamResponse:
            headers = {"Content-Type": EVENT_STREAM, "Cache-Control": "no-cache",
                       REQUEST_ID_KEY: http_exchange.request_id()}  # fmt: skip
            response = web.StreamResponse(headers=headers)
            await response.prepare(request)
            await response.write(_event(answer.chunk({"role": "assistant", "content": ""})))
            return response

        async def on_event(event: pb.GenerateStreamResponse) -> None:
            nonlocal opened, final
            if opened is None:
                opened = await open_stream()
            if event.WhichOneof("event") == "delta":
                text = scanner.push(event.delta)
                if text:
                    sent.append(text)
                    await opened.write(_event(answer.chunk({"content": text})))
            else:
                final = event.final

        stream_request = pb.GenerateStreamRequest.FromString(chat.generation.SerializeToString())
        error = await self.run_stream("GenerateStream", stream_request, on_event)
        if error is not None:
            error = _renamed(error, chat)
        response = opened
        if response is None:
            if error is not None:
                return self.error(request, error)
            response = await open_stream()
        if error is not None:
            http_exchange.note_error(error)
            await response.write(_event(openai_error(error)))
        elif final is not None:
            rest = scanner.flush()
            if rest and not final.refused:
                sent.append(rest)
                await response.write(_event(answer.chunk({"content": rest})))
            try:
                moderation = await report.finish(final, "".join(sent))
            except CallError as exc:  # scoring the answer failed (its deadline passed)
                http_exchange.note_error(exc)
                await response.write(_event(openai_error(exc)))
            else:
                last = answer.last_chunk(final, scanner.stopped, moderation)
                await response.write(_event(last))
                if chat.include_usage:
                    await response.write(_event(answer.usage_chunk(final)))
        await response.write(DONE)
        await response.write_eof()
        return response


class Report:
    """What moderation said of one answer, in OpenAI's shape, scoring the sides that are
    reported without blocking."""

    def __init__(
        self,
        route: ChatCompletions,
        chat: ChatRequest,
        info: pb.GetModelInfoResponse,
        names: ServedNames,
    ):
        self.call, self.chat = route.call, chat
        self.policies = {p.name: p for p in info.policies}
        self.model = names.primary(info.model)
        if chat.moderation_model is not None:
            try:
                policy = select_policy(chat.moderation_model, info, names, OPENAI_POLICY)
            except CallError as exc:
                raise CallError(exc.code, exc.message, "moderation.model") from exc
            chat.generation.policy = policy.name
            self.model = chat.moderation_model
        self.input: pb.ClassifyResponse | None = None

    def _request(self, messages: list[pb.ChatMessage]) -> pb.ClassifyRequest:
        g = self.chat.generation
        request = pb.ClassifyRequest(messages=messages, policy=g.policy)
        if g.HasField("threshold"):
            request.threshold = g.threshold
        return request

    async def _classify(self, messages: list[pb.ChatMessage]) -> pb.ClassifyResponse:
        try:
            result = await self.call("Classify", self._request(messages))
        except CallError as exc:
            raise _renamed(exc, self.chat) from exc
        return cast(pb.ClassifyResponse, result)

    async def score_input(self) -> None:
        if self.chat.score_input:
            self.input = await self._classify(list(self.chat.generation.messages))

    async def finish(self, response: pb.GenerateResponse, text: str) -> dict[str, Any] | None:
        """The `moderation` field, once the answer is known (None when none was asked for)."""
        if not self.chat.moderated:
            return None
        sides: dict[str, pb.ClassifyResponse | None] = {"input": self.input, "output": None}
        if response.HasField("input_moderation"):
            sides["input"] = response.input_moderation
        if response.HasField("output_moderation"):
            sides["output"] = response.output_moderation
        elif self.chat.score_output and not response.refused and text.strip():
            answer = pb.ChatMessage(role="assistant", content=text)
            sides["output"] = await self._classify([*self.chat.generation.messages, answer])
        return {
            side: None if r is None else moderation_results(r, self.policies[r.policy], self.model)
            for side, r in sides.items()
        }
