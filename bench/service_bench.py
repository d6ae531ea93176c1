"""Decisions per second through gRPC at 1, 8 and 32 concurrent callers, with p50/p99 latency.

Starts `moderation serve` as a subprocess on the demo model (or the ~60M benchmark weights with
--model60m) and drives it with asyncio gRPC clients, each sending its next Classify as soon as
the last one is answered. Two ratios matter: throughput at 32 callers over 1 caller, which only
batching can raise (target >= 4x), and throughput at 32 callers over the classifier's own rate
in-process at batch 32 (measured in the same run, before the server starts and after it
stops): what the serving path (gRPC, planning, the pipe, waking threads) leaves of the model's
rate (target >= 90%). It also prints the classifier in-process at batch 32 vs batch 1: what
batching could give at most on this machine, with no RPCs at all; and grpcio's own cost per
call (`bare_grpc.py`, a Classify with nothing behind it), so that the serving path's own cost
is printed apart from it, beside what the 90% target leaves it on this machine.

    python bench/service_bench.py [--model60m] [--requests N] [--rounds N] [--torch-threads N]
                                  [--no-model-process] [--batch-wait-ms MS] [--levels 1,8,32,64]
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
import urllib.request
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_checkpoint, machine
from moderation.v1 import moderation_pb2 as pb
from moderation.v1 import moderation_pb2_grpc as pb_grpc
from tests.servers import free_port, start_subprocess_server, wait_serving

TEXTS = [
    "How do I reset my router?",
    "You are an idiot and everyone hates you.",
    "What's a good recipe for pancakes?",
    "Where can I buy cheap prescription pills online?",
]


def calls_sent(requests: int, callers: int) -> int:
    """Calls one `run` sends: `requests`, after two warm-up calls per caller (their CPU is in
    the process's count too)."""
    return requests + 2 * callers


async def run(address: str, callers: int, requests: int) -> tuple[float, list[float]]:
    """(decisions/s, latencies) for `callers` concurrent clients sending `requests` in all."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ModerationServiceStub(channel)
        latencies: list[float] = []

        async def caller(numbers: list[int]) -> None:
            while numbers:
                i = numbers.pop()
                start = time.perf_counter()
                request = pb.ClassifyRequest(text=f"{TEXTS[i % len(TEXTS)]} #{i}")
                await stub.Classify(request, timeout=120)
                latencies.append(time.perf_counter() - start)

        warm_up = list(range(calls_sent(0, callers)))
        await asyncio.gather(*(caller(warm_up) for _ in range(callers)))
        latencies.clear()
        numbers = list(range(requests))
        start = time.perf_counter()
        await asyncio.gather(*(caller(numbers) for _ in range(callers)))
        return requests / (time.perf_counter() - start), latencies


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far; 0 where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def model_process(pid: int) -> int | None:
    """The model process of the server `pid` (its spawned child that is not multiprocessing's
    resource tracker), from /proc; None without one."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for kid in kids:
            command = Path(f"/proc/{kid}/cmdline").read_bytes()
            if b"spawn_main" in command and b"resource_tracker" not in command:
                return int(kid)
    except OSError:
        pass
    return None


def classify_passes(metrics_url: str) -> tuple[float, float]:
    """(classifier passes, texts classified) so far, from the server's /metrics."""
    time.sleep(0.6)  # a model process sends its metrics every 0.25 s: let the last ones in
    body = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    values = {}
    for line in body.splitlines():
        if line.startswith("moderation_batch_size_") and 'kind="classify"' in line:
            name = line.split("{")[0].removeprefix("moderation_batch_size_")
            values[name] = float(line.rsplit(" ", 1)[1])
    return values.get("count", 0.0), values.get("sum", 0.0)


def in_process_passes(model: Path | None, threads: int) -> tuple[dict[int, float], float]:
    """Seconds per classifier pass at batch 1, 8, 16 and 32, in this process, before the
    server starts: the cost of a pass (fixed part, per-text part) with no RPC at all; and
    seconds per pass of 32 texts never seen before (planned outside the timing), as the
    server's passes are: the same 32 texts again and again run faster (shapes and lengths
    repeat)."""
    import torch

    from moderation.core.decision import ClassifyItem
    from moderation.runtime import load_runtime

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rt = load_runtime(model, device="cpu", dtype="float32", score_batch_size=32)
        rt.classifier.warm_up()

        def planned(first: int, size: int) -> list[Any]:
            return [
                rt.classifier.plan(ClassifyItem(f"{TEXTS[i % 4]} #{i}"))
                for i in range(first, first + size)
            ]

        same = planned(0, 32)
        seconds = {}
        for size in (1, 8, 16, 32):
            batch = same[:size]
            rt.classifier.run(batch)
            passes, start = 0, time.perf_counter()
            while time.perf_counter() - start < 1.5:
                rt.classifier.run(batch)
                passes += 1
            seconds[size] = (time.perf_counter() - start) / passes
        fresh, spent, first = 0, 0.0, 1000
        while spent < 1.5:
            batch = planned(first, 32)
            first += 32
            start = time.perf_counter()
            rt.classifier.run(batch)
            spent += time.perf_counter() - start
            fresh += 1
        return seconds, spent / fresh
    finally:
        torch.set_num_threads(before)


def bare_grpc_cost(rounds: int, requests: int) -> tuple[float, float, float]:
    """(decisions/s, server CPU ms per call, callers' CPU ms per call) of `bare_grpc.py` at 32
    callers: grpcio's own cost per call here, under the front's (the serving path's own cost is
    the difference)."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("bare_grpc.py")), str(port)]
    )
    try:
        address = f"127.0.0.1:{port}"
        grpc.channel_ready_future(grpc.insecure_channel(address)).result(timeout=60)
        rates, server_cpu, client_cpu = [], 0.0, 0.0
        for _ in range(rounds):
            used, client = cpu_seconds(server.pid), time.process_time()
            rates.append(asyncio.run(run(address, 32, requests))[0])
            client_cpu += time.process_time() - client
            server_cpu += cpu_seconds(server.pid) - used
        calls = rounds * calls_sent(requests, 32)
        return statistics.median(rates), server_cpu / calls * 1e3, client_cpu / calls * 1e3
    finally:
        server.kill()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model60m", action="store_true", help="the ~60M benchmark weights")
    parser.add_argument(
        "--requests", type=int, default=384, help="Classify calls per level and round"
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds over the levels")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="the server's --torch-threads (0 = its default: cores - 1 in the model process)",
    )
    parser.add_argument(
        "--no-model-process",
        action="store_true",
        help="run the model in the server's process (the server's --no-model-process)",
    )
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        default=0.0,
        help="the server's --batch-wait-ms (how long a pass may wait to fill)",
    )
    parser.add_argument(
        "--levels",
        default="1,8,32",
        help="callers per level, comma-separated; 1 and 32 are what the ratios use (64, twice "
        "a full pass, shows what the passes would be if the callers were not one pass's worth)",
    )
    ns = parser.parse_args()
    levels = tuple(sorted({int(n) for n in ns.levels.split(",")} | {1, 32}))
    with tempfile.TemporaryDirectory() as tmp:
        model = bench_checkpoint(Path(tmp)) if ns.model60m else None
        cores = os.cpu_count() or 1
        threads = ns.torch_threads or (cores if ns.no_model_process else max(1, cores - 1))
        pass_seconds, fresh_seconds = in_process_passes(model, threads)
        ceiling = 32 * pass_seconds[1] / pass_seconds[32]
        port, metrics_port = free_port(), free_port()
        extra = ["--model", str(model)] if model else []
        proc: subprocess.Popen[str] = start_subprocess_server(
            port, *extra, "--metrics-port", str(metrics_port), "--max-batch-size", "32",
            # grpcio counts a finished call against this limit until its server side lets go
            # of it, and refuses new streams past it: room over the callers on one channel.
            "--max-concurrent-streams", str(max(100, 2 * max(levels))),
            "--log-level", "warning",
            *(["--torch-threads", str(ns.torch_threads)] if ns.torch_threads else []),
            *(["--no-model-process"] if ns.no_model_process else []),
            "--batch-wait-ms", str(ns.batch_wait_ms),
            env={"TMPDIR": tmp},
        )  # fmt: skip
        try:
            address = f"127.0.0.1:{port}"
            wait_serving(grpc.insecure_channel(address), timeout=300)
            metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            name = "60M model" if model else "demo model"
            where = "in the server process" if ns.no_model_process else "in a model process"
            print(f"# gRPC Classify, paper policy, {name} {where}, {threads} torch threads, "
                  f"--batch-wait-ms {ns.batch_wait_ms:g}; {machine()}")  # fmt: skip
            print(f"{'callers':>8} {'decisions/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6}"
                  f"   (median of {ns.rounds} rounds; latencies over all rounds)")  # fmt: skip
            # CPU time per call: what the serving path costs, less sensitive than a rate to
            # what else runs on the machine.
            pids = {"front": proc.pid}
            model_pid = model_process(proc.pid)  # None with --no-model-process
            if model_pid is not None:
                pids["model"] = model_pid
            cpu: dict[tuple[str, int], float] = {(p, c): 0.0 for p in pids for c in levels}
            # The callers (this process) share the machine's cores with the server: on a small
            # machine their CPU per call is part of what caps the rate.
            cpu.update({("client", c): 0.0 for c in levels})
            rates: dict[int, list[float]] = {c: [] for c in levels}
            latencies: dict[int, list[float]] = {c: [] for c in levels}
            batches: dict[int, list[float]] = {c: [] for c in levels}
            # Levels interleaved, round after round: this machine's speed drifts by tens of
            # percent over minutes, and each round's ratio compares levels measured together.
            for _ in range(ns.rounds):
                for callers in levels:
                    passes, items = classify_passes(metrics_url)
                    used = {p: cpu_seconds(pid) for p, pid in pids.items()}
                    client_cpu = time.process_time()
                    rate, lat = asyncio.run(run(address, callers, ns.requests))
                    cpu["client", callers] += time.process_time() - client_cpu
                    for p, pid in pids.items():
                        cpu[p, callers] += cpu_seconds(pid) - used[p]
                    more_passes, more_items = classify_passes(metrics_url)
                    rates[callers].append(rate)
                    latencies[callers] += lat
                    # Texts per classifier pass (warm-up included).
                    batches[callers].append((more_items - items) / max(more_passes - passes, 1))
            for callers in levels:
                q = statistics.quantiles(latencies[callers], n=100)
                print(f"{callers:8d} {statistics.median(rates[callers]):12.1f} "
                      f"{q[49] * 1e3:8.1f} {q[98] * 1e3:8.1f} "
                      f"{statistics.mean(batches[callers]):6.1f}")  # fmt: skip
            ratios = sorted(r32 / r1 for r1, r32 in zip(rates[1], rates[32], strict=True))
            ratio = statistics.median(ratios)
            print(f"throughput 32 callers / 1 caller: {ratio:.1f}x, median of rounds "
                  f"{', '.join(f'{r:.1f}x' for r in ratios)} (target >= 4x): "
                  f"{'met' if ratio >= 4 else 'MISSED'}")  # fmt: skip
            print("in-process classifier pass: " + ", ".join(
                f"batch {n}: {t * 1e3:.1f} ms" for n, t in pass_seconds.items()))  # fmt: skip
            print(f"in-process classifier, batch 32 / batch 1: {ceiling:.1f}x "
                  "(the most batching can give here, without any RPC)")  # fmt: skip
            for p in (*pids, "client"):
                per_call = ", ".join(  # each run sends 2 warm-up calls per caller too
                    f"{c} callers {cpu[p, c] / (ns.rounds * calls_sent(ns.requests, c)) * 1e3:.2f}"
                    for c in levels
                )
                print(f"{p} process CPU ms per call: {per_call}")
            print(f"load average after the run: {os.getloadavg()[0]:.2f}")
        finally:
            proc.terminate()
            proc.wait(60)
        bare_rate, bare_server, bare_client = bare_grpc_cost(ns.rounds, ns.requests)
        # The model's own rate again, the server stopped: the machine's speed drifts.
        after, fresh_after = in_process_passes(model, threads)
        model_rate = statistics.mean(32 / s[32] for s in (pass_seconds, after))
        fresh_rate = statistics.mean(32 / s for s in (fresh_seconds, fresh_after))
        grpc_rate = statistics.median(rates[32])
        print(
            f"in-process classifier at batch 32: {model_rate:.1f} decisions/s (mean of before "
            f"and after the server: {32 / pass_seconds[32]:.1f}, {32 / after[32]:.1f}); "
            f"new texts in every pass, as the server's: {fresh_rate:.1f} decisions/s"
        )
        print(
            f"gRPC at 32 callers / in-process batch 32: {grpc_rate / model_rate:.0%} (same 32 "
            f"texts in every pass), {grpc_rate / fresh_rate:.0%} (new texts in every pass); "
            f"target >= 90%: {'met' if grpc_rate / fresh_rate >= 0.9 else 'MISSED'}"
        )
        # What caps the rate on a small machine: the CPU every decision costs the callers, the
        # front and the model process together, over the machine's cores.
        calls = ns.rounds * calls_sent(ns.requests, 32)

        def at_32(process: str) -> float:
            """CPU ms per call of `process` at 32 callers."""
            return cpu[process, 32] / calls * 1e3

        used = sum(at_32(p) for p in (*pids, "client")) / 1e3
        cores = os.cpu_count() or 1
        print(
            f"CPU per decision at 32 callers (callers + front + model): {used * 1e3:.2f} ms; "
            f"{cores} cores fully used would give {cores / used:.0f} decisions/s, "
            f"{cores / used / fresh_rate:.0%} of the in-process rate"
        )
        own = at_32("front") - bare_server  # the serving path's own CPU per call
        # 32 callers and passes of up to 32: a model never idle starts its next pass while a
        # caller's answer is on its way back, so each caller rides every other pass at most.
        closed = statistics.mean(s[32] / (2 * s[16]) for s in (pass_seconds, after))
        print(
            f"32 callers, the model never idle: each caller rides every other pass at most, "
            f"passes average <= 16 texts, so at most about pass(32) / (2 x pass(16)) = "
            f"{closed:.0%} of the in-process batch-32 rate (in-process timings), whatever the "
            f"serving path costs; fuller passes need the model to wait for callers on their way "
            f"back"
        )
        print(
            f"bare gRPC servicer at 32 callers (grpcio alone, bench/bare_grpc.py): "
            f"{bare_rate:.0f} calls/s, server {bare_server:.2f} ms and callers "
            f"{bare_client:.2f} ms CPU per call; the serving path's own cost: front "
            f"{at_32('front'):.2f} - {bare_server:.2f} = {own:.2f} ms per call"
        )
        if "model" in pids:
            # What the target leaves the serving path on this machine: the callers, grpcio and
            # the model process share its cores, so at 90% of the in-process rate a decision
            # may cost them all together at most cores / (0.9 x that rate) of CPU.
            allowed = cores / (0.9 * fresh_rate) * 1e3
            fixed = at_32("client") + bare_server
            as_ran = allowed - fixed - at_32("model")
            full = allowed - fixed - 1e3 / fresh_rate
            print(
                f"90% of the in-process rate with {cores} cores fully used allows {allowed:.2f} "
                f"ms of CPU per decision: the serving path's own cost may then be at most "
                f"{as_ran:.2f} ms per call with the model process's passes as they ran "
                f"({statistics.mean(batches[32]):.1f} texts), {full:.2f} ms were every pass "
                f"full (the model at its in-process cost); it is {own:.2f} ms"
            )


if __name__ == "__main__":
    main()
