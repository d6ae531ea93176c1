"""The HTTP/JSON listener: transcoded RPCs, OpenAI's and Mistral's moderation routes, OpenAI's
chat completions (`chat_route`), `GET /v1/models` and `GET /health` (`discovery`).

Each request is one task on the server's event loop: the middleware opens its call record
(request id, route), checks the bearer token, and writes the request's log line and metrics;
the route reads the body (within `body_read_timeout`), decodes and checks it (`bodies`:
nesting, value and count limits before anything walks it; where `planning_threads` puts its
bytes), calls the servicer in-process and writes the JSON answer, all within the request's one
deadline (`exchange`: its `grpc-timeout`; every call made for it gets what is left). The port's
connections are held to the gRPC port's connection settings (`connections`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import grpc
import structlog
from aiohttp import web
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, Gauge, Histogram

from moderation.core.errors import prefix, quote
from moderation.serving import tracing
from moderation.serving.calls import (
    REQUEST_ID_KEY,
    BearerToken,
    CallRecord,
    bind_call,
    log_level,
    new_request_id,
)
from moderation.serving.http import (
    bodies,
    chat_route,
    compat,
    discovery,
    moderate_stream,
    transcoding,
)
from moderation.serving.http import exchange as http_exchange
from moderation.serving.http.connections import Connections, GuardedSite
from moderation.serving.http.context import HttpContext
from moderation.serving.http.names import ServedNames
from moderation.serving.http.status import CallError
from moderation.serving.metrics import LATENCY_BUCKETS, Metrics
from moderation.serving.planning_threads import PlanningThreads
from moderation.serving.settings import ServeSettings
from moderation.v1 import moderation_pb2, moderation_pb2_grpc

log = structlog.get_logger("moderation.requests")

SERVICE = moderation_pb2.DESCRIPTOR.services_by_name["ModerationService"]
OPENAI_PATH = "/v1/moderations"
MISTRAL_PATH = "/v1/chat/moderations"
# Routes in OpenAI's API: their errors have OpenAI's shape.
COMPAT_PATHS = (OPENAI_PATH, MISTRAL_PATH, chat_route.PATH, discovery.MODELS_PATH,
                "/v1/models/{model}")  # fmt: skip
NDJSON = "application/x-ndjson"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpMetrics:
    """HTTP requests, under OpenTelemetry's semantic-convention names as Prometheus spells them
    (http.server.request.duration, http.server.active_requests), on the server's registry. The
    grpc_server_* series stay gRPC's own: an HTTP request is counted here, not there; what the
    model did for it (tokens, decisions, queue) is counted where gRPC's calls are."""

    def __init__(self, registry: CollectorRegistry):
        self.duration = Histogram(
            "http_server_request_duration_seconds",
            "Duration of HTTP requests (to the last byte of a streamed answer)",
            ["http_request_method", "http_route", "http_response_status_code"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.active = Gauge(
            "http_server_active_requests", "HTTP requests being handled", registry=registry
        )


def ssl_context(settings: ServeSettings) -> ssl.SSLContext | None:
    """The gRPC port's TLS (certificate, key, client CA) for the HTTP port."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_client_ca is not None:
        context.load_verify_locations(cafile=settings.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["http/1.1"])
    return context


class HttpServer:
    """The HTTP listener of one server: same servicer, settings, token and metrics as gRPC."""

    def __init__(
        self,
        settings: ServeSettings,
        servicer: moderation_pb2_grpc.ModerationServiceServicer,
        metrics: Metrics,
        token: str | None,
        planning: PlanningThreads | None = None,
        serving: Callable[[], bool] = lambda: True,
    ):
        self.settings = settings
        self.servicer = servicer
        self.metrics = metrics
        self.http_metrics = HttpMetrics(metrics.registry)
        self.connections = Connections(settings, metrics.registry)
        self.limits = bodies.Limits.of(settings)
        # The servicer's planning threads: bodies are decoded where requests are tokenized.
        self.planning = planning or PlanningThreads(settings.plan_threads)
        self._token = BearerToken(token) if token else None
        self.names = ServedNames(settings.served_model_name)
        self.in_flight = 0  # touched only on the event loop; drain waits on it
        self.port: int | None = None
        self.app = web.Application(
            client_max_size=settings.max_message_bytes, middlewares=[self._middleware]
        )
        discovery.hide_server_version()
        for route in transcoding.routes(SERVICE):
            handler = self._stream(route) if route.server_streaming else self._unary(route)
            self.app.router.add_route(route.verb, route.path, handler)
        for path, reader, answer in COMPAT_ROUTES:
            # The answers name the served model: the listener's names, bound here.
            bound: compat.Answer = functools.partial(answer, names=self.names)
            self.app.router.add_post(path, self._compat(reader, bound))
        chat = chat_route.ChatCompletions(
            self.names, self._json, self._call, self._run_stream, self._error
        )
        self.app.router.add_post(chat_route.PATH, chat.handle)
        self.app.router.add_get(discovery.MODELS_PATH, self._compat_get(discovery.models))
        self.app.router.add_get(discovery.MODEL_PATH, self._compat_get(discovery.one_model))
        self.app.router.add_get(discovery.HEALTH_PATH, discovery.health_handler(serving))
        self.app.router.add_get(
            moderate_stream.PATH,
            moderate_stream.handler(
                servicer,
                limits=self.limits,
                max_message_bytes=settings.max_message_bytes,
                heartbeat=settings.keepalive_time,
                planning=self.planning,
                error_answer=self._error,
                note=self._note_stream,
            ),
        )
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ life

    async def start(self) -> None:
        # handler_cancellation: a client that hangs up cancels its request's task, which takes
        # it out of the model's batch, as a cancelled gRPC call is.
        runner = web.AppRunner(
            self.app,
            handler_cancellation=True,
            access_log=None,  # the middleware writes the one line per request
            shutdown_timeout=self.settings.grace_period,
            keepalive_timeout=self.settings.max_connection_idle,
        )
        await runner.setup()
        site = GuardedSite(
            runner,
            self.connections,
            self.settings.host,
            self.settings.http_port,
            ssl_context(self.settings),
        )
        await site.start()
        self._runner = runner
        self.port = site.bound_port

    async def stop(self) -> None:
        """Close the port; requests still running (the drain waited for them) are cancelled."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------ the edge

    def _authorized(self, request: web.Request) -> bool:
        if request.path == discovery.HEALTH_PATH:  # probes carry no token
            return True
        return self._token is None or self._token.accepts(request.headers.get("Authorization"))

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = new_request_id(request.headers.get(REQUEST_ID_KEY))
        info = request.match_info
        resource = info.route.resource if info.http_exception is None else None
        route = resource.canonical if resource is not None else ""
        record = CallRecord(method=route, request_id=request_id)
        bind_call(record)
        tracing.begin(record, f"HTTP {request.method} {route}")
        exchange = http_exchange.begin(record, request.headers.get(http_exchange.TIMEOUT_HEADER))
        self.in_flight += 1
        self.http_metrics.active.inc()
        self.connections.request_started(request.transport)
        status = 500
        response: web.StreamResponse | None = None
        try:
            if not self._authorized(request):
                message = "missing or invalid bearer token (header `Authorization: Bearer <token>`)"
                response = self._error(request, CallError(grpc.StatusCode.UNAUTHENTICATED, message))
            elif info.http_exception is not None:
                response = self._route_error(request, info.http_exception)
            else:
                response = await handler(request)
            if not response.prepared:
                response.headers[REQUEST_ID_KEY] = request_id
            status = response.status
            return response
        except CallError as exc:  # a limit of the listener itself (body size, read timeout)
            response = self._error(request, exc)
            status = response.status
            return response
        except (asyncio.CancelledError, ConnectionError):  # the client went away
            exchange.code, status = grpc.StatusCode.CANCELLED, 499
            raise
        except Exception as exc:  # a fault of ours: a JSON 500, logged with its traceback
            log.error("request failed", exc_info=exc)
            error = CallError(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})")
            status = error.status
            return self._error(request, error)
        finally:
            self.in_flight -= 1
            self.http_metrics.active.dec()
            if self.connections.request_ended(request.transport) and response is not None:
                response.force_close()  # past max_connection_age: reconnect, maybe elsewhere
            self._end(request, exchange, route, status)

    def _end(
        self, request: web.Request, exchange: http_exchange.Exchange, route: str, status: int
    ) -> None:
        record, code = exchange.record, exchange.code
        latency = time.perf_counter() - record.start
        tracing.end(record, code.name)
        self.http_metrics.duration.labels(request.method, route, str(status)).observe(latency)
        quiet = route == discovery.HEALTH_PATH and status == 200  # a probe every few seconds
        log.log(
            logging.DEBUG if quiet else log_level(code),
            "request",
            request_id=record.request_id,
            transport="http",
            http_method=request.method,
            route=route or prefix(request.path, 200),
            method=exchange.rpc,
            status=status,
            code=code.name,
            latency_ms=round(latency * 1000, 2),
            **record.fields,
        )

    def _error(self, request: web.Request, exc: CallError) -> web.Response:
        exc = exc.capped()  # as the gRPC side caps its status messages: one function for both
        http_exchange.note_error(exc)
        record = http_exchange.current().record
        info = request.match_info
        resource = info.route.resource if info.http_exception is None else None
        compatible = resource is not None and resource.canonical in COMPAT_PATHS
        body = compat.openai_error(exc) if compatible else exc.body()
        headers = {REQUEST_ID_KEY: record.request_id}
        return web.json_response(body, status=exc.status, headers=headers)

    def _note_stream(self, exc: CallError | None) -> dict[str, str]:
        """A ModerateStream call, for its log line (with its error once it failed): the
        headers of its WebSocket upgrade."""
        exchange = http_exchange.current()
        exchange.rpc = "ModerateStream"
        if exc is not None:
            http_exchange.note_error(exc)
        return {REQUEST_ID_KEY: exchange.record.request_id}

    def _route_error(self, request: web.Request, exc: web.HTTPException) -> web.Response:
        if exc.status == 405:
            error = CallError(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{quote(request.method)} is not allowed on {quote(request.path)}",
                http_status=405,
            )
        else:
            error = CallError(grpc.StatusCode.NOT_FOUND, f"no route {quote(request.path)}")
        response = self._error(request, error)
        if exc.status == 405:
            response.headers["Allow"] = exc.headers.get("Allow", "")
        return response

    async def _body(self, request: web.Request) -> bytes:
        """The request's body, within the size limit and `body_read_timeout`."""
        limit = self.settings.max_message_bytes
        try:
            async with asyncio.timeout(self.settings.body_read_timeout):
                return await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            raise CallError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request body larger than max ({request.content_length or 'more'} vs. {limit} "
                "bytes, MODERATION_MAX_MESSAGE_BYTES)",
                http_status=413,
            ) from exc
        except TimeoutError:
            raise CallError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the request body did not arrive within {self.settings.body_read_timeout:g} s "
                "(MODERATION_BODY_READ_TIMEOUT)",
                http_status=408,
            ) from None

    def _message(self, data: bytes, route: transcoding.Route) -> Message:
        """A transcoded route's request from its body (on a planning thread when large)."""
        descriptor = route.request_type.DESCRIPTOR
        value = bodies.decode(data, self.limits, batch="requests" in descriptor.fields_by_name)
        if route.body != "*":
            value = {route.body: value}
        bodies.check_counts(value, descriptor, self.limits)
        return transcoding.parse(value, route.request_type)

    def _compat_request(self, data: bytes, reader: compat.Reader) -> compat.CompatRequest:
        """A compatible route's request from its body (on a planning thread when large)."""
        return reader(bodies.decode(data, self.limits, batch=True), self.limits)

    # ------------------------------------------------------------- calling

    async def _call(self, rpc: str, message: Message) -> Any:
        """A unary method of the servicer, in this task, within what is left of the request's
        deadline (not started once it has passed): its status as a CallError."""
        async with http_exchange.within() as deadline:
            context = HttpContext(deadline)
            method = getattr(self.servicer, rpc)
            try:
                return await method(message, cast(grpc.aio.ServicerContext, context))
            except grpc.aio.AbortError:
                raise context.error() from None

    async def _decoded(self, data: bytes, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(data, *args), decoding a body, where the planning rule puts `data`."""
        return await self.planning.run(len(data), fn, data, *args)

    async def _json(self, request: web.Request) -> Any:
        """The request's JSON body (chat completions'), decoded as every body is."""
        data = await self._body(request)
        return await self._decoded(data, _decode_json, self.limits)

    async def _request(self, request: web.Request, route: transcoding.Route) -> Message:
        http_exchange.current().rpc = route.rpc
        if route.body == "":  # a GET: the query string, bounded by aiohttp's line limit
            return transcoding.parse_query(request.query, route.request_type)
        return cast(Message, await self._decoded(await self._body(request), self._message, route))

    def _unary(self, route: transcoding.Route) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                async with http_exchange.within():  # reading and parsing count against it too
                    message = await self._request(request, route)
                    response = await self._call(route.rpc, message)
            except CallError as exc:
                return self._error(request, exc)
            return web.json_response(transcoding.to_json(response))

        return handle

    def _compat(self, reader: compat.Reader, answer: compat.Answer) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            exchange = http_exchange.current()
            exchange.rpc = "ClassifyBatch"
            record = exchange.record
            try:
                async with http_exchange.within():
                    data = await self._body(request)
                    read = await self._decoded(data, self._compat_request, reader)
                    return web.json_response(await answer(self._call, read, record.request_id))
            except CallError as exc:
                return self._error(request, exc)

        return handle

    def _compat_get(self, answer: Callable[..., Awaitable[dict[str, Any]]]) -> Handler:
        """A GET route of OpenAI's API: `answer(call, names, **path variables)`."""

        async def handle(request: web.Request) -> web.StreamResponse:
            http_exchange.current().rpc = "GetModelInfo"
            try:
                variables = dict(request.match_info)
                return web.json_response(await answer(self._call, self.names, **variables))
            except CallError as exc:
                return self._error(request, exc)

        return handle

    async def _run_stream(
        self, rpc: str, message: Message, on_event: chat_route.OnEvent
    ) -> CallError | None:
        """A server-streaming method of the servicer, each event handed to `on_event`, all
        within what is left of the request's deadline (as a gRPC deadline covers a stream to
        its end); the status it ended with, None when OK. Times the deltas as the gRPC stream
        does."""
        context = HttpContext(http_exchange.deadline())
        method = getattr(self.servicer, rpc)
        events: AsyncIterator[Any] = method(message, cast(grpc.aio.ServicerContext, context))
        start, last = time.perf_counter(), None
        try:
            async with http_exchange.within():
                async for event in events:
                    if event.WhichOneof("event") == "delta":  # as the gRPC stream counts it
                        now = time.perf_counter()
                        if last is None:
                            self.metrics.time_to_first_token.observe(now - start)
                        else:
                            self.metrics.inter_token_latency.observe(now - last)
                        last = now
                    await on_event(event)
        except grpc.aio.AbortError:
            return context.error()
        except CallError as exc:  # the deadline passed (or had, before the first event)
            return exc
        finally:
            await cast(Any, events).aclose()
        return None

    def _stream(self, route: transcoding.Route) -> Handler:
        """A server-streaming method as newline-delimited JSON, grpc-gateway's shape: one
        {"result": message} per line, or {"error": ...} as the last line when the call fails
        after the first message; before it, the error is an ordinary error answer."""

        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                async with http_exchange.within():
                    message = await self._request(request, route)
            except CallError as exc:
                return self._error(request, exc)
            response: web.StreamResponse | None = None

            async def write(event: Message) -> None:
                nonlocal response
                if response is None:
                    headers = {"Content-Type": NDJSON, REQUEST_ID_KEY: http_exchange.request_id()}
                    response = web.StreamResponse(headers=headers)
                    await response.prepare(request)
                line = json.dumps({"result": transcoding.to_json(event)})
                await response.write(line.encode() + b"\n")

            error = await self._run_stream(route.rpc, message, write)
            if response is None:
                if error is not None:
                    return self._error(request, error)
                response = web.StreamResponse(headers={"Content-Type": NDJSON})
                await response.prepare(request)
            elif error is not None:
                http_exchange.note_error(error)
                await response.write(json.dumps(error.body()).encode() + b"\n")
            await response.write_eof()
            return response

        return handle


COMPAT_ROUTES: tuple[tuple[str, compat.Reader, compat.NamedAnswer], ...] = (
    (OPENAI_PATH, compat.read_openai, compat.openai_moderations),
    (MISTRAL_PATH, compat.read_mistral, compat.mistral_chat_moderations),
)
"""The compatible routes: path, reader (off the event loop), answer (given the served
names when registered)."""


def _decode_json(data: bytes, limits: bodies.Limits) -> Any:
    return bodies.decode(data, limits, batch=False)
