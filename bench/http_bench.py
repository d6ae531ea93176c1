"""HTTP/JSON vs gRPC latency for the same Classify, same server, same run.

Starts `moderation serve` as a subprocess on the demo model with both ports (log level
warning) and sends, one caller at a time and interleaved call by call, the same request over a
kept-alive HTTP/1.1 connection (POST /v1/classify, JSON) and over a gRPC channel (Classify,
protobuf), so both see the same machine at the same moment. GetModelInfo (GET /v1/model), which
does no model work, is timed the same way: there the difference is the transport alone. Then
the server's CPU per call for each, and Classify throughput with --callers concurrent callers.

    python bench/http_bench.py [--requests N] [--rounds N] [--no-model-process]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine
from moderation.v1 import moderation_pb2 as pb
from moderation.v1 import moderation_pb2_grpc as pb_grpc
from tests.servers import free_port, start_subprocess_server, wait_listening, wait_serving

TEXT = "Where can I buy cheap prescription pills online?"


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of the process `pid` and its children (the model process), from
    /proc: what a call costs the server, less sensitive to the machine's load than latency."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) == pid or int(fields[1]) == pid:  # fields[1]: the parent's pid
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


async def concurrent(port: int, http_port: int, callers: int, calls: int) -> dict[str, float]:
    """Classify decisions per second with `callers` concurrent asyncio callers, each sending its
    next call when the last is answered: gRPC (one channel, multiplexed) vs HTTP (aiohttp's
    client, a kept-alive connection per caller)."""
    import aiohttp

    request = pb.ClassifyRequest(text=TEXT, policy="paper")
    body = {"text": TEXT, "policy": "paper"}
    rates = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ModerationServiceStub(channel)

        async def grpc_caller() -> None:
            for _ in range(calls // callers):
                await stub.Classify(request, timeout=60)

        connector = aiohttp.TCPConnector(limit=callers)
        async with aiohttp.ClientSession(connector=connector) as session:
            url = f"http://127.0.0.1:{http_port}/v1/classify"

            async def http_caller() -> None:
                for _ in range(calls // callers):
                    async with session.post(url, json=body) as response:
                        assert response.status == 200
                        await response.json()

            for name, caller in (("gRPC", grpc_caller), ("HTTP", http_caller)):
                await asyncio.gather(*(caller() for _ in range(callers)))  # warm-up
                start = time.perf_counter()
                await asyncio.gather(*(caller() for _ in range(callers)))
                rates[name] = (calls // callers * callers) / (time.perf_counter() - start)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="calls per transport per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-model-process", action="store_true")
    parser.add_argument("--callers", type=int, default=8, help="concurrent callers (last part)")
    ns = parser.parse_args()
    port, http_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc: subprocess.Popen[str] = start_subprocess_server(
            port, "--http-port", str(http_port), "--log-level", "warning",
            *(["--no-model-process"] if ns.no_model_process else []), env={"TMPDIR": tmp},
        )  # fmt: skip
        try:
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            wait_serving(channel, timeout=300)
            wait_listening(http_port)
            stub = pb_grpc.ModerationServiceStub(channel)
            conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=60)
            body = json.dumps({"text": TEXT, "policy": "paper"})
            request = pb.ClassifyRequest(text=TEXT, policy="paper")

            def over_http(method: str, path: str, payload: str | None) -> None:
                headers = {"Content-Type": "application/json"} if payload else {}
                conn.request(method, path, body=payload, headers=headers)
                response = conn.getresponse()
                data = response.read()
                assert response.status == 200, data
                json.loads(data)

            cases = {
                "Classify": (
                    lambda: over_http("POST", "/v1/classify", body),
                    lambda: stub.Classify(request, timeout=60),
                ),
                "GetModelInfo": (
                    lambda: over_http("GET", "/v1/model", None),
                    lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60),
                ),
            }
            print(f"# HTTP/JSON vs gRPC, one caller, demo model, paper policy; {machine()}")
            print(f"# {ns.rounds} rounds of {ns.requests} calls per transport, interleaved")
            print(f"{'method':>13} {'gRPC p50 ms':>12} {'HTTP p50 ms':>12} {'HTTP/gRPC':>10} "
                  f"{'gRPC p99':>9} {'HTTP p99':>9}  per-round ratios of medians")  # fmt: skip
            cpus: list[tuple[str, dict[str, float]]] = []
            for name, (http_call, grpc_call) in cases.items():
                for _ in range(20):  # warm-up: connections, first passes
                    http_call(), grpc_call()
                over_grpc: list[float] = []
                over_http_s: list[float] = []
                ratios = []
                for _ in range(ns.rounds):
                    g, h = [], []
                    for _ in range(ns.requests):
                        g.append(timed(grpc_call))
                        h.append(timed(http_call))
                    ratios.append(statistics.median(h) / statistics.median(g))
                    over_grpc += g
                    over_http_s += h
                # Server CPU per call, each transport alone for a block of calls.
                cpu = {}
                for transport, fn in (("gRPC", grpc_call), ("HTTP", http_call)):
                    before = cpu_seconds(proc.pid)
                    for _ in range(ns.requests * 2):
                        fn()
                    cpu[transport] = (cpu_seconds(proc.pid) - before) / (ns.requests * 2)
                cpus.append((name, cpu))
                qg = statistics.quantiles(over_grpc, n=100)
                qh = statistics.quantiles(over_http_s, n=100)
                print(f"{name:>13} {qg[49] * 1e3:12.2f} {qh[49] * 1e3:12.2f} "
                      f"{qh[49] / qg[49]:9.2f}x {qg[98] * 1e3:9.2f} {qh[98] * 1e3:9.2f}  "
                      + ", ".join(f"{r:.2f}" for r in ratios))  # fmt: skip
            for name, cpu in cpus:
                g, h = cpu["gRPC"] * 1e3, cpu["HTTP"] * 1e3
                print(f"{name:>13} server CPU per call: gRPC {g:.2f} ms, HTTP {h:.2f} ms "
                      f"({h / g:.2f}x)")  # fmt: skip
            # Concurrent callers, the transports in turn, rounds interleaved.
            rounds = [
                asyncio.run(concurrent(port, http_port, ns.callers, ns.requests))
                for _ in range(ns.rounds)
            ]
            g = statistics.median(r["gRPC"] for r in rounds)
            h = statistics.median(r["HTTP"] for r in rounds)
            print(f"{ns.callers} concurrent callers, Classify decisions/s (median of {ns.rounds} "
                  f"rounds): gRPC {g:.1f}, HTTP {h:.1f} ({h / g:.2f}x); rounds "
                  + ", ".join(f"{r['HTTP'] / r['gRPC']:.2f}" for r in rounds))  # fmt: skip
            print(f"load average after the run: {os.getloadavg()[0]:.2f}")
        finally:
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    main()
