"""`moderation serve`: the gRPC server's life from start to drain.

Start: bind the port with health NOT_SERVING, load the model in a thread, then SERVING.
Stop (SIGTERM/SIGINT): NOT_SERVING, refuse new work (UNAVAILABLE), let in-flight calls finish
within the grace period, stop the model worker, exit 0. Health and reflection stay reachable
without a token so that probes and tooling work when bearer-token auth is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import structlog
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from moderation.core.cpus import available_cpus
from moderation.exit_codes import EXIT_ERROR, EXIT_OK
from moderation.runtime import Runtime
from moderation.serving import interpreter, tracing
from moderation.serving.front import Front
from moderation.serving.grpc.interceptors import BearerTokenAuth, RequestTelemetry
from moderation.serving.grpc.servicer import ModerationServicer, ServiceState
from moderation.serving.grpc.stream_limit import StreamLimitWatch
from moderation.serving.http.server import HttpServer
from moderation.serving.metrics import Metrics
from moderation.serving.settings import ServeSettings
from moderation.serving.worker import Worker
from moderation.serving.worker.loader import load_from_settings
from moderation.serving.worker.model_process import ProcessWorker
from moderation.serving.worker.worker_thread import WorkerThread
from moderation.v1 import moderation_pb2, moderation_pb2_grpc

log = structlog.get_logger("moderation.serving.grpc.server")

SERVICE_NAME = moderation_pb2.DESCRIPTOR.services_by_name["ModerationService"].full_name
HEALTH_NAMES = ("", SERVICE_NAME)  # the server as a whole, and the service by name
LOADER_THREAD = "model-loader"

Loader = Callable[[ServeSettings], Runtime]


def _credentials(settings: ServeSettings) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    pair = [(Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes())]
    if settings.tls_client_ca is None:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(
        pair, root_certificates=Path(settings.tls_client_ca).read_bytes(), require_client_auth=True
    )


class Server:
    """One serving process: gRPC server, health, metrics endpoint and the model worker.

    With `settings.model_process` the model runs in a process of its own; otherwise `loader`
    loads it in this process (the tests load their demo checkpoint that way).
    """

    def __init__(self, settings: ServeSettings, *, loader: Loader = load_from_settings):
        self.settings = settings
        self.loader = loader
        self.runtime: Runtime | None = None  # the model, when it runs in this process
        self.metrics = Metrics.create()
        self.state = ServiceState(settings=settings, metrics=self.metrics)
        self.health = health.aio.HealthServicer()
        self.telemetry = RequestTelemetry(self.metrics)
        # Outermost first: the stream watch counts every call a connection holds (health,
        # reflection and calls without a valid token hold a stream too); telemetry sees every
        # ModerationService call.
        self.stream_watch = StreamLimitWatch(
            settings.max_concurrent_streams, self.metrics.stream_limit_reached.inc
        )
        interceptors: list[grpc.aio.ServerInterceptor] = [self.stream_watch, self.telemetry]
        token = settings.resolve_auth_token()
        if token:
            interceptors.append(BearerTokenAuth(token))
        self.grpc = grpc.aio.server(interceptors=interceptors, options=settings.grpc_options())
        self.servicer = ModerationServicer(self.state)
        moderation_pb2_grpc.add_ModerationServiceServicer_to_server(self.servicer, self.grpc)
        # The HTTP/JSON listener answers with the same servicer, hence the same worker.
        self._serving = False  # what health reports for the whole server (HTTP's /health too)
        self.http = (
            HttpServer(
                settings,
                self.servicer,
                self.metrics,
                token,
                self.state.planning,
                serving=self._is_serving,
            )
            if settings.http_port
            else None
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
        )
        address = f"{settings.host}:{settings.port}"
        check_port_free(settings.host, settings.port)
        credentials = _credentials(settings)
        if credentials is None:
            self.port = self.grpc.add_insecure_port(address)
        else:
            self.port = self.grpc.add_secure_port(address, credentials)
        self._metrics_http: Any = None
        self._watchdog: asyncio.Task[None] | None = None
        self._model_dead = False

    def _is_serving(self) -> bool:
        return self._serving and not self.state.draining

    async def _set_health(self, status: int) -> None:
        self._serving = status == health_pb2.HealthCheckResponse.SERVING
        for name in HEALTH_NAMES:
            await self.health.set(name, status)  # type: ignore[arg-type]

    async def start(self) -> None:
        """Listen at once (NOT_SERVING), load the model, then report SERVING."""
        if self.settings.tracing:
            tracing.enable()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc.start()
        if self.http is not None:
            await self.http.start()
        if self.settings.metrics_port:
            self._metrics_http = self.metrics.serve_http(
                self.settings.metrics_port, self.settings.host
            )
        log.info(
            "listening", port=self.port, tls=self.settings.tls,
            mutual_tls=self.settings.mutual_tls, metrics_port=self.settings.metrics_port,
            http_port=self.settings.http_port,
        )  # fmt: skip
        worker: Worker
        if self.settings.model_process:
            # The model in a process of its own (see moderation.serving.worker.model_process); this
            # process keeps what validates requests at the door.
            worker = ProcessWorker(self.settings, self.metrics, on_exit=self._model_exited)
            front = Front.of_model_process(await worker.load(), self.settings)
        else:
            torch.set_num_threads(self.settings.torch_threads or available_cpus())
            self.runtime = await _in_daemon_thread(lambda: self.loader(self.settings))
            worker = WorkerThread(
                self.runtime,
                self.metrics,
                max_queue=self.settings.max_queue,
                max_items_per_pass=self.settings.max_batch_items,
                batch_wait=self.settings.batch_wait_ms / 1000,
            )
            front = Front.of_runtime(self.runtime)
        worker.start()
        self.state.front, self.state.worker = front, worker
        model = front.model
        if model.demo:
            log.warning(
                "serving the demo model: random weights, meaningless decisions; "
                "pass --model DIR (MODERATION_MODEL) for real weights",
                model=model.model_id,
            )
        self.metrics.record_model(
            model.model_id, demo=model.demo, device=model.device, dtype=model.dtype
        )
        log.info("serving", model=model.model_id, device=model.device, dtype=model.dtype)
        for live in front.planner.live_thresholds():
            # What a request that sets no threshold is decided with, per policy.
            log.info(
                "thresholds", policy=live.policy, threshold=live.threshold,
                category_thresholds=dict(live.category_thresholds), source=live.source,
            )  # fmt: skip
            self.metrics.record_thresholds(live)
        log.info("start-up objects frozen", objects=interpreter.tune_front_process())
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        if self.settings.model_stall_timeout > 0:
            self._watchdog = asyncio.create_task(self._watch(worker))

    async def _watch(self, worker: Worker) -> None:
        """NOT_SERVING while the model shows no sign of life for `model_stall_timeout` (a hung
        or stopped model process looks alive otherwise); SERVING again when it moves.

        The model is pinged every interval and answers between passes, idle or busy, so the
        watch does not depend on work being queued: callers whose deadlines expire leave the
        queue empty, and a stopped model must still be found."""
        timeout = self.settings.model_stall_timeout
        stalled = False
        while True:
            worker.ping()
            await asyncio.sleep(min(1.0, timeout / 4))
            idle_for = time.monotonic() - worker.last_progress
            now_stalled = idle_for > timeout
            if now_stalled == stalled or self.state.draining or self._model_dead:
                continue
            stalled = now_stalled
            self.metrics.model_stalled.set(int(stalled))
            if stalled:
                log.error(
                    "the model makes no progress; reporting NOT_SERVING",
                    seconds=round(idle_for, 1), queued=worker.queue_depth,
                )  # fmt: skip
                await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            else:
                log.warning("the model makes progress again; reporting SERVING")
                await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def _model_exited(self) -> None:
        """The model process died: no more answers here, so tell probes and balancers."""
        self._model_dead = True
        self._health_task = asyncio.create_task(
            self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        )

    async def stop(self) -> None:
        """Drain: NOT_SERVING, no new work, in-flight calls finish within the grace period."""
        grace = self.settings.grace_period
        log.info("draining", grace_period=grace, in_flight=self.in_flight)
        self.state.draining = True  # new calls get UNAVAILABLE: retry on another replica
        if self._watchdog is not None:
            self._watchdog.cancel()
        await self.health.enter_graceful_shutdown()  # NOT_SERVING for good, for every name
        # Keep answering while in-flight calls finish, so probes and load balancers see the
        # drain (NOT_SERVING, UNAVAILABLE) rather than a closed port.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await self.grpc.stop(max(0.0, deadline - loop.time()))
        if self.http is not None:
            await self.http.stop()
        if self.state.worker is not None:
            worker = self.state.worker
            await asyncio.to_thread(worker.stop, max(0.0, deadline - loop.time()))
        self.state.planning.shutdown()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        log.info("stopped", in_flight=self.in_flight)

    @property
    def in_flight(self) -> int:
        """Calls being handled, over gRPC and HTTP: what the drain waits for."""
        return self.telemetry.in_flight + (self.http.in_flight if self.http is not None else 0)


def check_port_free(host: str, port: int) -> None:
    """OSError naming the port when something listens there already. Checked before gRPC
    binds: its C core would print a raw line of its own first, and with SO_REUSEPORT (gRPC's
    default) it could even share the port with another server silently."""
    if port == 0:
        return  # any free port
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)  # fmt: skip
        family, kind, proto, _, sockaddr = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine
            probe.bind(sockaddr)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise OSError(
                f"port {port} on {host} is in use (--port, MODERATION_PORT): {exc.strerror}"
            ) from None
        # Anything else (no IPv6 here, a name to resolve): gRPC's own bind decides.


async def _in_daemon_thread(fn: Callable[[], Runtime]) -> Runtime:
    """fn() in a daemon thread: unlike asyncio.to_thread, a SIGTERM during a long model load
    does not have to wait for the load to finish before the process exits."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Runtime] = loop.create_future()

    def settle(value: Runtime | None, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)  # type: ignore[arg-type]

    def target() -> None:
        try:
            value, exc = fn(), None
        except BaseException as e:
            value, exc = None, e
        with contextlib.suppress(RuntimeError):  # the loop is gone: stopped while loading
            loop.call_soon_threadsafe(settle, value, exc)

    threading.Thread(target=target, name=LOADER_THREAD, daemon=True).start()
    return await future


async def serve(
    settings: ServeSettings,
    *,
    loader: Loader = load_from_settings,
    stop: asyncio.Event | None = None,
) -> int:
    """Run until SIGTERM/SIGINT (or `stop` is set), then drain; returns the exit code."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = Server(settings, loader=loader)
    starting = asyncio.create_task(server.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    code = EXIT_OK
    if starting.done() and starting.exception() is not None:
        log.error("could not start", exc_info=starting.exception())
        code = EXIT_ERROR
    elif not starting.done():
        starting.cancel()  # stopped while loading: nothing to drain
    else:
        await stopping
    stopping.cancel()
    await server.stop()
    return code
