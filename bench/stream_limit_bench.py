"""What the per-connection stream count (serving/grpc/stream_limit.py) adds to a call.

A whole-service bench cannot see it on a shared machine (its noise is milliseconds), so each
part is timed alone, best of `--repeats` rounds, on one event loop:

- the wrapper around a handler (a coroutine; an async generator of 1 and of 16 answers),
  against the same handler unwrapped, with a stand-in context whose `peer()` is free;
- `context.peer()` of a real grpc.aio call (a string made by the C core on every call),
  timed inside a handler of a loopback server;
- for scale, a whole unary call on a loopback server (a handler that does nothing; client and
  server on one loop, one pass-through interceptor as the service's telemetry).

    python bench/stream_limit_bench.py [--calls 20000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc

from bench.common import machine
from moderation.serving.grpc.stream_limit import StreamLimitWatch
from moderation.v1 import moderation_pb2 as pb
from moderation.v1 import moderation_pb2_grpc as pb_grpc


class Context:
    """The part of a ServicerContext the wrapper reads."""

    def peer(self) -> str:
        return "ipv4:10.1.2.3:54321"


async def one(request: Any, context: Any) -> Any:
    return request


def answers(n: int) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
        for _ in range(n):
            yield request

    return stream


async def best_ns(run: Callable[[], Coroutine[Any, Any, None]], calls: int, repeats: int) -> float:
    """Nanoseconds per call of `run`, the fastest of `repeats` rounds of `calls` calls."""
    best = float("inf")
    for _ in range(repeats + 1):  # the first round warms up
        start = time.perf_counter_ns()
        for _ in range(calls):
            await run()
        best = min(best, (time.perf_counter_ns() - start) / calls)
    return best


async def wrapper_costs(calls: int, repeats: int) -> list[tuple[str, float, float]]:
    watch = StreamLimitWatch(100, lambda: None)
    ctx = Context()
    rows = []
    plain, counted = one, watch._counted(one)

    async def unary() -> None:
        await plain(None, ctx)

    async def unary_counted() -> None:
        await counted(None, ctx)

    rows.append(
        (
            "unary",
            await best_ns(unary, calls, repeats),
            await best_ns(unary_counted, calls, repeats),
        )
    )
    for n in (1, 16):
        stream = answers(n)
        wrapped = watch._counted(stream)

        async def drain(handler: Any = stream) -> None:
            async for _ in handler(None, ctx):
                pass

        async def drain_counted(handler: Any = wrapped) -> None:
            async for _ in handler(None, ctx):
                pass

        rows.append(
            (
                f"stream of {n}",
                await best_ns(drain, calls, repeats),
                await best_ns(drain_counted, calls, repeats),
            )
        )
    return rows


class PeerTimer(pb_grpc.ModerationServiceServicer):
    def __init__(self, inner: int):
        self.inner = inner
        self.ns: list[float] = []

    async def GetModelInfo(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        start = time.perf_counter_ns()
        for _ in range(self.inner):
            context.peer()
        self.ns.append((time.perf_counter_ns() - start) / self.inner)
        return pb.GetModelInfoResponse()


async def peer_cost(calls: int) -> float:
    timer = PeerTimer(inner=1000)
    server = grpc.aio.server()
    pb_grpc.add_ModerationServiceServicer_to_server(timer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ModerationServiceStub(channel)
            for _ in range(calls):
                await stub.GetModelInfo(pb.GetModelInfoRequest())
    finally:
        await server.stop(0)
    return min(timer.ns)


class PassThrough(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        return await continuation(details)


class Empty(pb_grpc.ModerationServiceServicer):
    async def GetModelInfo(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.GetModelInfoResponse()


async def roundtrip_us(calls: int, repeats: int) -> float:
    """Microseconds per sequential unary call on a loopback server (best round): the scale
    the wrapper's cost is compared to. Not an A/B of the interceptor: on a shared machine
    rounds of the same server differ by more than the wrapper costs (measured: +-100 us)."""
    server = grpc.aio.server(interceptors=[PassThrough()])
    pb_grpc.add_ModerationServiceServicer_to_server(Empty(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    best = float("inf")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ModerationServiceStub(channel)
            await stub.GetModelInfo(pb.GetModelInfoRequest())  # connected
            for _ in range(repeats):
                start = time.perf_counter()
                for _ in range(calls):
                    await stub.GetModelInfo(pb.GetModelInfoRequest())
                best = min(best, (time.perf_counter() - start) / calls * 1e6)
    finally:
        await server.stop(0)
    return best


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(machine())
    print(f"{'handler':<14} {'plain ns':>10} {'counted ns':>11} {'added ns':>9}")
    for name, plain, counted in await wrapper_costs(args.calls, args.repeats):
        print(f"{name:<14} {plain:>10.0f} {counted:>11.0f} {counted - plain:>9.0f}")
    print(f"context.peer() of a real call: {await peer_cost(20):.0f} ns (best of 20 calls)")
    us = await roundtrip_us(args.calls // 10, args.repeats)
    print(f"for scale, a loopback unary call that does nothing: {us:.0f} us")


if __name__ == "__main__":
    asyncio.run(main())
