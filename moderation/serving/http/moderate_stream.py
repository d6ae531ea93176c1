"""ModerateStream over HTTP: a WebSocket at /v1/moderate/stream.

Why a WebSocket and not an ndjson request body streamed in beside ndjson streamed out: the
check is a conversation (the caller sends pieces while verdicts come back), and proxies carry
that well only as a WebSocket. Most buffer a request body whole before passing it on (nginx's
`proxy_request_buffering` is on by default, as are many load balancers' and API gateways'),
so a streamed body would arrive at the end, checks and all; and HTTP/1.1 clients (`requests`,
browsers' `fetch`) do not read a response while still sending the body. WebSockets are
message-framed and pass nginx, ingress-nginx, Envoy, HAProxy, cloud load balancers and
Cloudflare as they are (nginx needs its usual `Upgrade`/`Connection` headers).

Each text message is one ModerateStreamRequest in the proto3 JSON mapping; each answer is
`{"result": ModerateStreamResponse}`; a failure is `{"error": ...}` (the shape of every other
route) and the server closes with 1000 after the last verdict, 1013 (try again later) when it
is loading, draining or full, 1008 after a caller's error, 1011 after its own. The upgrade
request has every limit of the other routes: the bearer token (401 before any upgrade),
`grpc-timeout` (the whole call: the request's one deadline, `exchange`), `x-request-id`, one
log line. Each message has every limit of a request body: over --max-message-bytes closes the
socket (1009); nesting, JSON values and counts are checked on the bytes before anything walks
them (`bodies`), and errors are capped as every route's are. Only aiohttp's frame reader
(unmasking, UTF-8) runs on the event loop for every message; a message is parsed where the
planning rule puts its size (`planning_threads`, as every body: small ones on the loop, larger
ones on the planning threads). The servicer enforces the rest (open checks, answer length, idle
time between messages: pings do not count as messages).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import aiohttp
import grpc
from aiohttp import web

from moderation.core.errors import InvalidArgument
from moderation.serving.http import bodies, transcoding
from moderation.serving.http import exchange as http_exchange
from moderation.serving.http.context import HttpContext
from moderation.serving.http.status import CallError
from moderation.serving.planning_threads import PlanningThreads
from moderation.v1 import moderation_pb2 as pb

PATH = "/v1/moderate/stream"


def parse_message(data: str, limits: bodies.Limits) -> pb.ModerateStreamRequest:
    """One text message as a request, within the limits every other route's body has (nesting,
    JSON values and counts checked before anything walks it); InvalidArgument otherwise."""
    try:
        if not data:  # an empty HTTP body means {}, an empty message is no JSON at all
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, "an empty message, not JSON")
        value = bodies.decode(data.encode(), limits, batch=False)
        bodies.check_counts(value, pb.ModerateStreamRequest.DESCRIPTOR, limits)
        return cast(pb.ModerateStreamRequest, transcoding.parse(value, pb.ModerateStreamRequest))
    except CallError as exc:  # the servicer maps domain errors, not HTTP ones
        field = exc.field or "message"
        raise InvalidArgument(field, exc.message.removeprefix(f"{field}: ")) from None


async def _requests(
    ws: web.WebSocketResponse, limits: bodies.Limits, planning: PlanningThreads
) -> AsyncIterator[pb.ModerateStreamRequest]:
    """The caller's messages; the stream ends when the socket closes (a caller that hangs
    up ends its check: it never said `done`)."""
    async for message in ws:
        if message.type == aiohttp.WSMsgType.TEXT:
            yield await planning.run(len(message.data), parse_message, message.data, limits)
        elif message.type == aiohttp.WSMsgType.BINARY:
            raise InvalidArgument("message", "expected JSON text messages, got a binary one")
        else:  # an error (a message too large closes the socket), or a close
            return


RETRY_LATER = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
CALLER_ERRORS = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.CANCELLED,
)


def close_code(code: grpc.StatusCode) -> int:
    """The WebSocket close code after a failure: try again later (a server loading, draining
    or full), the caller's error, or the server's."""
    if code in RETRY_LATER:
        return int(aiohttp.WSCloseCode.TRY_AGAIN_LATER)
    if code in CALLER_ERRORS:
        return int(aiohttp.WSCloseCode.POLICY_VIOLATION)
    return int(aiohttp.WSCloseCode.INTERNAL_ERROR)


def handler(
    servicer: Any,
    *,
    limits: bodies.Limits,
    max_message_bytes: int,
    heartbeat: float,
    planning: PlanningThreads,
    error_answer: Callable[[web.Request, CallError], web.Response],
    note: Callable[[CallError | None], dict[str, str]],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The route's handler (the listener's middleware has checked the token already).
    `planning` parses large messages off the loop; `note(error)` records the call for its log
    line and gives the headers to answer with."""

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            deadline = http_exchange.deadline()
        except CallError as exc:
            return error_answer(request, exc)
        # No permessage-deflate: aiohttp inflates a message on the event loop, so a 4 KB
        # frame of spaces would cost the loop what 4 MiB of wire does (~15 ms); the answers
        # are small JSON and the deltas a few words, so compression saves callers little.
        ws = web.WebSocketResponse(
            max_msg_size=max_message_bytes, heartbeat=heartbeat, compress=False
        )
        ws.headers.update(note(None))
        if not ws.can_prepare(request).ok:
            return error_answer(
                request,
                CallError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{PATH} is a WebSocket: send an Upgrade request",
                ),
            )
        await ws.prepare(request)
        context = HttpContext(deadline)
        requests = _requests(ws, limits, planning)
        answers = servicer.ModerateStream(requests, cast(grpc.aio.ServicerContext, context))
        error: CallError | None = None
        try:
            async with http_exchange.within():
                async for answer in answers:
                    await ws.send_str(json.dumps({"result": transcoding.to_json(answer)}))
        except grpc.aio.AbortError:
            error = context.error()
        except CallError as exc:  # the deadline passed
            error = exc
        except ConnectionError:  # the caller went away mid-send
            pass
        finally:
            await answers.aclose()
        with contextlib.suppress(ConnectionError, RuntimeError):
            if error is None:
                await ws.close(code=aiohttp.WSCloseCode.OK)
            else:
                error = error.capped()  # as every other route's errors are
                note(error)
                await ws.send_str(json.dumps(error.body()))
                await ws.close(code=close_code(error.code), message=error.code.name.encode())
        return ws

    return handle
