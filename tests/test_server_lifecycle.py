"""The server's life in Kubernetes: NOT_SERVING while loading, SERVING, then on SIGTERM a drain
that lets calls in flight finish and exits 0; a failed load exits non-zero."""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moderation.exit_codes import EXIT_ERROR, EXIT_OK
from moderation.runtime import Runtime
from moderation.serving.grpc.server import serve
from moderation.serving.settings import ServeSettings
from moderation.v1 import moderation_pb2 as pb
from moderation.v1 import moderation_pb2_grpc as pb_grpc
from tests.servers import (
    NOT_SERVING,
    SERVING,
    InProcessServer,
    demo_loader,
    free_port,
    health_status,
    start_subprocess_server,
    wait_serving,
)


def user(text: str) -> list[pb.ChatMessage]:
    return [pb.ChatMessage(role="user", content=text)]


def test_health_while_loading_serving_and_draining(demo_checkpoint: Path) -> None:
    release = threading.Event()
    load = demo_loader(demo_checkpoint)

    def slow_load(settings: ServeSettings) -> Runtime:
        release.wait(60)
        return load(settings)

    server = InProcessServer(
        ServeSettings(
            model_process=False, host="127.0.0.1", port=free_port(), metrics_port=0, grace_period=20
        ),
        slow_load,
    )
    channel = grpc.insecure_channel(server.address)
    stub = pb_grpc.ModerationServiceStub(channel)
    try:
        assert health_status(channel) == NOT_SERVING
        assert health_status(channel, "moderation.v1.ModerationService") == NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(pb.ClassifyRequest(text="too early"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        release.set()
        server.wait_loaded()
        assert health_status(channel) == SERVING
        # Drain with a call in flight: NOT_SERVING at once, the call still completes.
        in_flight = stub.Generate.future(
            pb.GenerateRequest(messages=user("a long one"), max_new_tokens=400)
        )
        time.sleep(0.1)
        stopping = threading.Thread(target=server.stop)
        stopping.start()
        time.sleep(0.05)
        assert health_status(channel) == NOT_SERVING
        assert health_status(channel, "moderation.v1.ModerationService") == NOT_SERVING
        with pytest.raises(grpc.RpcError) as late:  # no new work while draining
            stub.Classify(pb.ClassifyRequest(text="too late"))
        assert late.value.code() == grpc.StatusCode.UNAVAILABLE
        assert in_flight.result(timeout=60).completion_tokens == 400
        stopping.join(30)
    finally:
        release.set()


def test_sigterm_lets_calls_in_flight_complete_and_exits_0(tmp_path: Path) -> None:
    port = free_port()
    proc = start_subprocess_server(port, "--grace-period", "30", env={"TMPDIR": str(tmp_path)})
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        wait_serving(channel)
        stub = pb_grpc.ModerationServiceStub(channel)
        request = pb.GenerateRequest(messages=user("keep talking"), max_new_tokens=48)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            calls = [pool.submit(stub.Generate, request) for _ in range(4)]
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            results = [c.result(timeout=120) for c in calls]
        assert all(r.completion_tokens > 0 for r in results)
        assert proc.wait(timeout=60) == 0
        output = proc.stdout.read() if proc.stdout else ""
        assert "draining" in output and "demo" in output  # the demo warning is in the log
        assert "did not stop in time" not in output and "model process exited" not in output
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_normal_sigterm_stops_the_model_process_silently(tmp_path: Path) -> None:
    # Issue #11, point 10: an idle server's SIGTERM used to log an error about the model
    # process (or kill it) because its exit was judged one second after the pipe closed.
    port = free_port()
    proc = start_subprocess_server(port, "--grace-period", "0", env={"TMPDIR": str(tmp_path)})
    try:
        wait_serving(grpc.insecure_channel(f"127.0.0.1:{port}"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        output = proc.stdout.read() if proc.stdout else ""
        assert '"stopped"' in output
        assert "did not stop in time" not in output and "model process exited" not in output
    finally:
        if proc.poll() is None:
            proc.kill()


def _serve_with(loader: object, port: int, *, stop_it: bool) -> tuple[int, int, float]:
    """Run serve() with this loader (stopped once it listens if `stop_it`); returns its exit
    code, the health it reported while loading and how long it ran."""
    settings = ServeSettings(
        model_process=False, host="127.0.0.1", port=port, metrics_port=0, grace_period=5
    )

    async def scenario() -> tuple[int, int]:
        stop = asyncio.Event()
        server = asyncio.create_task(serve(settings, loader=loader, stop=stop))  # type: ignore[arg-type]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            request = health_pb2.HealthCheckRequest()
            status = (await check(request, wait_for_ready=True, timeout=10)).status
        if stop_it:
            stop.set()
        return await asyncio.wait_for(server, 20), status

    start = time.monotonic()
    code, status = asyncio.run(scenario())
    return code, status, time.monotonic() - start


def test_a_stop_during_the_model_load_exits_0_without_waiting_for_it() -> None:
    release = threading.Event()

    def endless_load(settings: ServeSettings) -> Runtime:
        release.wait(60)
        raise RuntimeError("released")

    try:
        code, status, seconds = _serve_with(endless_load, free_port(), stop_it=True)
    finally:
        release.set()
    assert (code, status) == (EXIT_OK, NOT_SERVING) and seconds < 10


def test_a_failed_model_load_exits_with_an_error() -> None:
    def broken_load(settings: ServeSettings) -> Runtime:
        time.sleep(0.5)  # long enough for the health check to see NOT_SERVING first
        raise FileNotFoundError("no such checkpoint")

    code, status, _ = _serve_with(broken_load, free_port(), stop_it=False)
    assert (code, status) == (EXIT_ERROR, NOT_SERVING)
