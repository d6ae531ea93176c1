"""Helpers for tests that run a real server on a loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import structlog
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from moderation.runtime import Runtime
from moderation.serving.grpc.server import Server
from moderation.serving.logs import configure_logging
from moderation.serving.settings import ServeSettings
from moderation.serving.worker.loader import load_from_settings

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo_loader(checkpoint: Path) -> Callable[[ServeSettings], Runtime]:
    """Load the demo checkpoint the tests wrote (a fresh runtime per server, real engine), in
    the server's process, on CPU in float32, whatever the settings say of the model."""

    def load(settings: ServeSettings) -> Runtime:
        return load_from_settings(
            dataclasses.replace(settings, model=str(checkpoint), device="cpu", dtype="float32")
        )

    return load


class InProcessServer:
    """A Server on its own event loop in a background thread."""

    def __init__(
        self,
        settings: ServeSettings,
        loader: Callable[[ServeSettings], Runtime] = load_from_settings,
    ):
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: Server = self.call(self._make(loader))
        self._start = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop)

    async def _make(self, loader: Callable[[ServeSettings], Runtime]) -> Server:
        return Server(self.settings, loader=loader)

    def call(self, coro: Any, timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def wait_loaded(self, timeout: float = 120) -> None:
        self._start.result(timeout)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def stop(self) -> None:
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@contextlib.contextmanager
def demo_server(checkpoint: Path, **settings: Any) -> Iterator[InProcessServer]:
    """A loaded in-process server on the demo checkpoint: the model in the server's process,
    free ports, no metrics listener, unless `settings` (ServeSettings fields) say otherwise."""
    base: dict[str, Any] = {
        "model_process": False,
        "host": "127.0.0.1",
        "port": free_port(),
        "metrics_port": 0,
    }
    server = InProcessServer(ServeSettings(**{**base, **settings}), demo_loader(checkpoint))
    try:
        server.wait_loaded()
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def captured_logs(level: str = "info") -> Iterator[list[dict[str, Any]]]:
    """The structlog events at `level` and above logged in the block (by any thread), whatever
    level an earlier test's command left configured; structlog's defaults after."""
    configure_logging(level)
    try:
        with structlog.testing.capture_logs() as logs:
            yield logs
    finally:
        structlog.reset_defaults()


def invalid_field(err: grpc.RpcError) -> str:
    """The field an INVALID_ARGUMENT names in its rich details (google.rpc.BadRequest)."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "no rich status details"
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            return str(bad.field_violations[0].field)
    raise AssertionError("no BadRequest detail")


def health_status(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def wait_serving(channel: grpc.Channel, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if health_status(channel) == SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise TimeoutError("server did not report SERVING")


def start_subprocess_server(
    port: int, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """`python -m moderation serve` on the demo model, as an operator would start it."""
    return subprocess.Popen(
        [sys.executable, "-m", "moderation", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--metrics-port", "0", *extra],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip


def http_call(
    url: str,
    body: Any = None,
    *,
    method: str | None = None,
    headers: dict[str, str] | None = None,
    context: Any = None,
    timeout: float = 60,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request with the standard library: (status, headers lower-cased, body), errors
    included (urllib raises them)."""
    import urllib.error
    import urllib.request

    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.status, _lower(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, _lower(err.headers), err.read()


def _lower(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def wait_listening(port: int, timeout: float = 60) -> None:
    """Until something accepts connections on 127.0.0.1:port (a server binds its ports in its
    start(), which runs on its own loop after the InProcessServer is made)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
