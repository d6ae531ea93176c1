"""`moderation serve`: the gRPC server's life from start to drain.

Start: bind the port with health NOT_SERVING, load the model in a thread, then SERVING.
Stop (SIGTERM/SIGINT): NOT_SERVING, refuse new work, let in-flight calls finish within the
grace period, stop the model worker, exit 0. Health and reflection stay reachable without a
token so that probes and tooling work when bearer-token auth is on.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from moderation.logs import configure_logging
from moderation.runtime import Runtime, load_runtime
from moderation.scheduler import ModelWorker
from moderation.service import ModerationServicer, ServiceState
from moderation.settings import (
    ServeSettings,
    SettingsError,
    add_serve_arguments,
    settings_from_args,
)
from moderation.telemetry import Metrics
from moderation.v1 import moderation_pb2, moderation_pb2_grpc

log = structlog.get_logger("moderation.server")

SERVICE_NAME = moderation_pb2.DESCRIPTOR.services_by_name["ModerationService"].full_name
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

Loader = Callable[[ServeSettings], Runtime]


def load_from_settings(settings: ServeSettings) -> Runtime:
    """The runtime a server with these settings serves (the demo model without --model)."""
    runtime = load_runtime(
        settings.model,
        device=settings.device,
        dtype=settings.dtype,
        attention_backend=settings.attention_backend,
        policy_files=settings.policy_files,
        default_policy=settings.policy,
        threshold=settings.threshold,
        long_text=settings.long_text,
        max_batch_size=settings.max_batch_size,
        score_batch_size=settings.max_batch_size,
        max_new_tokens_limit=settings.max_new_tokens,
    )
    runtime.classifier.warm_up()  # pre-fill every policy prefix before reporting SERVING
    return runtime


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED unless `authorization: Bearer <token>`; health and reflection are open."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(_OPEN_PREFIXES):
            return await continuation(details)
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        sent_bytes = sent.encode() if isinstance(sent, str) else sent
        if hmac.compare_digest(sent_bytes, self._expected):
            return await continuation(details)
        handler = await continuation(details)

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

        if handler is not None and handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny)  # type: ignore[arg-type]
        return grpc.unary_unary_rpc_method_handler(deny)


def _credentials(settings: ServeSettings) -> grpc.ServerCredentials | None:
    if not settings.tls:
        return None
    assert settings.tls_cert is not None and settings.tls_key is not None
    pair = [(Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes())]
    if settings.tls_client_ca:
        return grpc.ssl_server_credentials(
            pair,
            root_certificates=Path(settings.tls_client_ca).read_bytes(),
            require_client_auth=True,
        )
    return grpc.ssl_server_credentials(pair)


class Server:
    """One serving process: gRPC server, health, metrics endpoint and the model worker."""

    def __init__(self, settings: ServeSettings, *, loader: Loader = load_from_settings):
        self.settings = settings
        self.loader = loader
        self.metrics = Metrics.create()
        self.state = ServiceState(settings=settings, metrics=self.metrics)
        self.health = health.aio.HealthServicer()
        token = settings.resolve_auth_token()
        interceptors = [BearerTokenInterceptor(token)] if token else []
        limit = settings.max_message_bytes
        self.grpc = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
            ],
        )
        moderation_pb2_grpc.add_ModerationServiceServicer_to_server(
            ModerationServicer(self.state), self.grpc
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
        )
        address = f"{settings.host}:{settings.port}"
        credentials = _credentials(settings)
        if credentials is None:
            self.port = self.grpc.add_insecure_port(address)
        else:
            self.port = self.grpc.add_secure_port(address, credentials)
        self.loaded = asyncio.Event()
        self._metrics_server: Any = None

    async def _set_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> None:
        """Listen at once (NOT_SERVING), then load the model in a thread."""
        await self._set_health(False)
        await self.grpc.start()
        if self.settings.metrics_port:
            self._metrics_server, _ = start_http_server(
                self.settings.metrics_port, addr=self.settings.host, registry=self.metrics.registry
            )
        log.info(
            "listening",
            port=self.port,
            tls=self.settings.tls,
            metrics_port=self.settings.metrics_port,
        )
        runtime = await asyncio.to_thread(self.loader, self.settings)
        worker = ModelWorker(runtime, self.metrics, max_queue=self.settings.max_queue)
        worker.start()
        self.state.runtime, self.state.worker = runtime, worker
        if runtime.demo:
            log.warning(
                "serving the demo model: random weights, meaningless decisions",
                model=runtime.model_id,
            )
        log.info("serving", model=runtime.model_id, device=runtime.device, dtype=runtime.dtype)
        await self._set_health(True)
        self.loaded.set()

    async def stop(self) -> None:
        """Drain: NOT_SERVING, no new work, in-flight calls finish within the grace period."""
        log.info(
            "draining", grace_period=self.settings.grace_period, in_flight=self.state.in_flight
        )
        self.state.draining = True  # new calls now get UNAVAILABLE: retry on another replica
        await self._set_health(False)
        # Keep answering (health says NOT_SERVING, new work is refused) while in-flight calls
        # finish, so probes and load balancers see the drain instead of a closed port.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.grace_period
        while self.state.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await self.grpc.stop(max(0.0, deadline - loop.time()))
        if self.state.worker is not None:
            await asyncio.to_thread(self.state.worker.stop, self.settings.grace_period)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        log.info("stopped")


async def serve(settings: ServeSettings, *, stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or `stop` is set), then drain."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = Server(settings)
    start = asyncio.create_task(server.start())
    await stop.wait()
    if not start.done():
        start.cancel()
    await server.stop()


def _run(ns: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(ns)
        settings.resolve_auth_token()
    except SettingsError as exc:
        print(f"moderation serve: error: {exc}")
        return 2
    configure_logging(settings.log_level)
    asyncio.run(serve(settings))
    return 0


def register(sub: Any) -> None:
    """Add the `serve` subcommand."""
    p = sub.add_parser("serve", help="run the gRPC moderation server")
    add_serve_arguments(p)
    p.set_defaults(func=_run)
