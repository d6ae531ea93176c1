"""Rows per second of `moderation batch` on the ~60M benchmark weights, in-process and remote.

Remote: a `moderation serve` subprocess on the same weights, the batch client keeping N
requests in flight. Both score the same CSV of short comments with the paper policy; the
ratio remote / in-process shows what the gRPC hop costs on one machine.

    python bench/batch_bench.py [--rows N]
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_checkpoint, machine
from moderation.api.remote import RemoteOptions, RemoteScorer
from moderation.jobs.batch import BatchJob, run
from moderation.jobs.scoring import LocalScorer
from moderation.runtime import load_runtime
from tests.servers import free_port, start_subprocess_server, wait_serving

COMMENTS = [
    "Great article, thanks for sharing!",
    "This is the dumbest thing I have ever read, you moron.",
    "Where can I get cheap pills without a prescription?",
    "Does anyone know a good plumber in Leeds?",
]


def job(inp: Path, out: Path) -> BatchJob:
    return BatchJob(
        input=str(inp), output=str(out), text_column="text", prompt_column=None, role="input",
        policy=None, threshold=None, encoding="utf-8-sig", delimiter=",", batch_size=64,
        resume=False, escape_formulas=False,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = bench_checkpoint(root)
        inp = root / "in.csv"
        with open(inp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", "text"])
            for i in range(ns.rows):
                w.writerow([i, f"{COMMENTS[i % len(COMMENTS)]} ({i})"])
        print(f"# moderation batch, {ns.rows} rows, 60M model, paper policy; {machine()}")
        runtime = load_runtime(folder, device="cpu", dtype="float32", score_batch_size=64)
        runtime.classifier.warm_up()
        start = time.perf_counter()
        run(job(inp, root / "local.csv"), LocalScorer(runtime))
        local = ns.rows / (time.perf_counter() - start)
        print(f"in-process: {local:8.1f} rows/s")
        del runtime

        port = free_port()
        server = start_subprocess_server(port, "--model", str(folder), "--log-level", "warning",
                                         "--max-batch-size", "64", env={"TMPDIR": tmp})  # fmt: skip
        try:
            address = f"127.0.0.1:{port}"
            wait_serving(grpc.insecure_channel(address), timeout=300)
            scorer = RemoteScorer(RemoteOptions(targets=(address,), concurrency=8, chunk=16))
            start = time.perf_counter()
            run(job(inp, root / "remote.csv"), scorer)
            remote = ns.rows / (time.perf_counter() - start)
            scorer.close()
        finally:
            server.terminate()
            server.wait(60)
        print(f"remote:     {remote:8.1f} rows/s ({remote / local:.2f}x in-process)")


if __name__ == "__main__":
    main()
