"""Health latency while 64 callers send the largest bodies the limits allow, on either port.

Issue #19's gate: gRPC and HTTP health answer in under 100 ms at p99 while 64 callers send the
largest bodies the default limits allow (4 MiB messages, 256 batch items, 256 messages): batches
of long texts, batches of conversations of many short messages, OpenAI and Mistral batches, and
the count bombs the issue measured (1.3 M empty items, 1 M strings), over HTTP and over gRPC.
Every body is refused after it is parsed (an unknown policy or model in it, or a limit), so the
load is the parsing the gate is about, not model work. Starts `moderation serve` on the demo
model as a subprocess; probes gRPC health (Check) and HTTP (GET /v1/model) every 20 ms from a
process of its own, idle
first (the baseline, same run), then under load; loopback only, bounded loops.

    python bench/health_under_load.py [--callers 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import multiprocessing.queues
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine
from moderation.v1 import moderation_pb2 as pb
from moderation.v1 import moderation_pb2_grpc as pb_grpc
from tests.servers import free_port, start_subprocess_server, wait_listening, wait_serving

MIB = 1024 * 1024
ITEMS, MESSAGES, CHARS = 256, 256, 15_000  # the defaults; 256 x 15,000 chars is just under 4 MiB


def http_bodies() -> dict[str, tuple[str, bytes]]:
    """(path, body) of each shape, each under 4 MiB."""
    text = "x" * CHARS
    message = {"role": "user", "content": "hi"}
    conversation = [message] * (MESSAGES - 1)
    shapes = {
        "texts": ("/v1/classify/batch",
                  {"requests": [{"text": text, "policy": "nope"}] * ITEMS}),
        "conversations": ("/v1/classify/batch",
                          {"requests": [{"messages": conversation, "policy": "nope"}] * ITEMS}),
        "openai": ("/v1/moderations", {"input": [text] * ITEMS, "model": "nope"}),
        "mistral": ("/v1/chat/moderations", {"input": [conversation] * ITEMS, "model": "nope"}),
    }  # fmt: skip
    bodies = {name: (path, json.dumps(body).encode()) for name, (path, body) in shapes.items()}
    bodies["empty items"] = ("/v1/classify/batch", b'{"requests": [' + b"{}," * 1_300_000 + b"{}]}")
    bodies["strings"] = ("/v1/moderations", b'{"input": [' + b'"",' * 1_000_000 + b'""]}')
    for name, (_, body) in bodies.items():
        assert len(body) < 4 * MIB, (name, len(body))
    return bodies


def grpc_requests() -> dict[str, pb.ClassifyBatchRequest]:
    text = "x" * CHARS
    conversation = [pb.ChatMessage(role="user", content="hi")] * (MESSAGES - 1)
    shapes = {
        "texts": pb.ClassifyBatchRequest(
            requests=[pb.ClassifyRequest(text=text, policy="nope")] * ITEMS
        ),
        "conversations": pb.ClassifyBatchRequest(
            requests=[pb.ClassifyRequest(messages=conversation, policy="nope")] * ITEMS
        ),
        "empty items": pb.ClassifyBatchRequest(requests=[pb.ClassifyRequest()] * 1_300_000),
    }
    for name, request in shapes.items():
        assert request.ByteSize() < 4 * MIB, (name, request.ByteSize())
    return shapes


class Probe:
    """Health on both transports every 20 ms from a process of its own (as the kubelet probes
    from outside the pod), so that the load generator's threads do not delay the probe's own
    client; latencies kept per transport."""

    def __init__(self, grpc_address: str, http_port: int):
        context = multiprocessing.get_context("spawn")
        self._stop, self._ready = context.Event(), context.Event()
        self._results: multiprocessing.queues.Queue[tuple[dict[str, list[float]], int]] = (
            context.Queue()
        )
        self._process = context.Process(
            target=probe_loop,
            args=(grpc_address, http_port, self._stop, self._ready, self._results),
        )
        self.latency: dict[str, list[float]] = {"grpc": [], "http": []}
        self.failures = 0

    def __enter__(self) -> Probe:
        self._process.start()
        if not self._ready.wait(60):
            raise RuntimeError("the probe process did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.latency, self.failures = self._results.get(timeout=60)
        self._process.join(30)


def probe_loop(grpc_address: str, http_port: int, stop: Any, ready: Any, results: Any) -> None:
    """The probe process: gRPC Check and HTTP GET /v1/model in turn every 20 ms until `stop`
    (`ready` set once its imports and channel are up, so start-up is not counted)."""
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(grpc_address))
    latency: dict[str, list[float]] = {"grpc": [], "http": []}
    failures = 0

    def grpc_check() -> bool:
        answer = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    def http_check() -> bool:
        connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
        try:
            connection.request("GET", "/v1/model")
            response = connection.getresponse()
            response.read()
            return response.status == 200
        finally:
            connection.close()

    ready.set()
    while not stop.is_set():
        for transport, call in (("grpc", grpc_check), ("http", http_check)):
            start = time.perf_counter()
            try:
                ok = call()
            except Exception:
                ok = False
            latency[transport].append(time.perf_counter() - start)
            failures += not ok
        time.sleep(0.02)
    results.put((latency, failures))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(probe: Probe) -> dict[str, dict[str, float]]:
    return {
        t: {"n": len(v), "p50_ms": 1000 * statistics.median(v),
            "p99_ms": 1000 * percentile(v, 0.99), "max_ms": 1000 * max(v)}
        for t, v in probe.latency.items()
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="requests per caller")
    parser.add_argument("--only", help="send only the shapes whose name contains this")
    args = parser.parse_args()
    port, http_port = free_port(), free_port()
    server = start_subprocess_server(
        port, "--http-port", str(http_port), "--log-level", "error", "--max-queue", "4096"
    )
    try:
        wait_listening(http_port)
        wait_serving(grpc.insecure_channel(f"127.0.0.1:{port}"))
        bodies, messages = http_bodies(), grpc_requests()
        shapes: list[Callable[[], int | str]] = []
        names: list[str] = []
        for name, (path, body) in bodies.items():
            names.append(f"http {name}")
            shapes.append(lambda path=path, body=body: post(http_port, path, body))
        stub = pb_grpc.ModerationServiceStub(
            grpc.insecure_channel(
                f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 8 * MIB)]
            )
        )
        for name, request in messages.items():
            names.append(f"grpc {name}")
            shapes.append(lambda request=request: grpc_call(stub, request))
        if args.only:
            shapes = [s for n, s in zip(names, shapes, strict=True) if args.only in n]
            names = [n for n in names if args.only in n]

        with Probe(f"127.0.0.1:{port}", http_port) as idle:
            time.sleep(3)
        codes: dict[int | str, int] = {}
        lock = threading.Lock()

        def caller(index: int) -> None:
            for r in range(args.rounds):
                code = shapes[(index + r) % len(shapes)]()
                with lock:
                    codes[code] = codes.get(code, 0) + 1

        start = time.perf_counter()
        with Probe(f"127.0.0.1:{port}", http_port) as loaded:
            threads = [threading.Thread(target=caller, args=(i,)) for i in range(args.callers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        seconds = time.perf_counter() - start
        result = {
            "machine": machine(),
            "callers": args.callers,
            "shapes": names,
            "requests": args.callers * args.rounds,
            "seconds": round(seconds, 1),
            "answers": {str(k): v for k, v in codes.items()},
            "idle": summary(idle),
            "loaded": summary(loaded),
            "probe_failures": loaded.failures,
        }
        for t in ("grpc", "http"):
            result[f"{t}_p99_ratio_loaded_vs_idle"] = round(
                result["loaded"][t]["p99_ms"] / max(result["idle"][t]["p99_ms"], 1e-3), 2
            )
        print(json.dumps(result, indent=2, default=lambda x: round(x, 1)))
    finally:
        server.terminate()
        server.wait(60)


def post(port: int, path: str, body: bytes) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def grpc_call(stub: pb_grpc.ModerationServiceStub, request: pb.ClassifyBatchRequest) -> int | str:
    try:
        stub.ClassifyBatch(request, timeout=300)
        return "OK"
    except grpc.RpcError as exc:
        return str(exc.code().name)


if __name__ == "__main__":
    main()
