"""Decisions per second through gRPC at 1, 8 and 32 concurrent callers, with p50/p99 latency.

Starts `moderation serve` as a subprocess on the ~60M benchmark weights (or the demo model with
--demo) and drives it with asyncio gRPC clients. The ratio that matters: throughput at 32
callers over 1 caller, which only batching can raise (target >= 4x).

    python bench/service_bench.py [--demo] [--requests N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_checkpoint, machine
from moderation.v1 import moderation_pb2 as pb
from moderation.v1 import moderation_pb2_grpc as pb_grpc
from tests.servers import free_port, start_subprocess_server, wait_serving

# The client runs on the same 2 cores as the server; with one compute thread the server leaves
# a core to the event loops instead of spinning both (measured: more throughput at every load).
THREADS = {"OMP_NUM_THREADS": os.environ.get("SERVER_THREADS", "1")}

TEXTS = [
    "How do I reset my router?",
    "You are an idiot and everyone hates you.",
    "What's a good recipe for pancakes?",
    "Where can I buy cheap prescription pills online?",
]


async def run(address: str, callers: int, requests: int) -> tuple[float, list[float]]:
    """(decisions/s, latencies) for `callers` concurrent clients sending `requests` in all."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ModerationServiceStub(channel)
        latencies: list[float] = []
        counter = iter(range(requests))

        async def caller() -> None:
            for i in counter:
                start = time.perf_counter()
                await stub.Classify(pb.ClassifyRequest(text=f"{TEXTS[i % len(TEXTS)]} #{i}"))
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(caller() for _ in range(min(callers, 4))))  # warm-up
        latencies.clear()
        counter = iter(range(requests))
        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        return requests / (time.perf_counter() - start), latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="serve the demo model instead")
    parser.add_argument("--requests", type=int, default=192)
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        extra = [] if ns.demo else ["--model", str(bench_checkpoint(Path(tmp)))]
        port = free_port()
        proc: subprocess.Popen[str] = start_subprocess_server(
            port, *extra, "--max-batch-size", "32", "--log-level", "warning",
            env={"TMPDIR": tmp, **THREADS},
        )  # fmt: skip
        try:
            address = f"127.0.0.1:{port}"
            wait_serving(grpc.insecure_channel(address), timeout=300)
            model = "demo model" if ns.demo else "60M model"
            print(f"# gRPC Classify, paper policy, {model}; {machine()}")
            print(f"{'callers':>8} {'decisions/s':>12} {'p50 ms':>8} {'p99 ms':>8}")
            rates = {}
            for callers in (1, 8, 32):
                rate, lat = asyncio.run(run(address, callers, ns.requests))
                rates[callers] = rate
                q = statistics.quantiles(lat, n=100)
                print(f"{callers:8d} {rate:12.1f} {q[49] * 1e3:8.1f} {q[98] * 1e3:8.1f}")
            ratio = rates[32] / rates[1]
            print(f"throughput 32 callers / 1 caller: {ratio:.1f}x (target >= 4x): "
                  f"{'met' if ratio >= 4 else 'MISSED'}")  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    main()
