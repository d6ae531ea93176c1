"""`moderation batch` in-process under a CPU quota: the default threads (the quota) against
the host's cores (what torch used before `--torch-threads` read the quota).

Makes a cgroup with a CFS quota of `--cpus` CPUs (cgroup v1 `cpu` or v2 `cpu.max`; needs
root and a writable cgroup tree, as in a container run with privileges), runs `moderation
batch` on the ~60M benchmark weights inside it with the default threads and with
`--torch-threads <host cores>`, alternately, and prints the scoring time of each (a run's
wall time less that of a one-row run: the model's load is the same in both) and their ratio.

    python bench/cpu_quota_bench.py [--cpus 1] [--rows 96] [--repeats 2]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_checkpoint, machine
from moderation.core.cpus import available_cpus

ROOT = Path(__file__).resolve().parent.parent
V1 = Path("/sys/fs/cgroup/cpu")
V2 = Path("/sys/fs/cgroup")


def make_cgroup(cpus: float) -> tuple[Path, Callable[[], None]]:
    """A cgroup limited to `cpus` CPUs; returns the file a pid is written to, and a cleanup."""
    period = 100_000
    if (V1 / "cpu.cfs_quota_us").exists():
        folder = V1 / f"moderation-bench-{os.getpid()}"
        folder.mkdir()
        (folder / "cpu.cfs_period_us").write_text(f"{period}\n")
        (folder / "cpu.cfs_quota_us").write_text(f"{int(cpus * period)}\n")
        return folder / "cgroup.procs", folder.rmdir
    folder = V2 / f"moderation-bench-{os.getpid()}"
    folder.mkdir()
    (folder / "cpu.max").write_text(f"{int(cpus * period)} {period}\n")
    return folder / "cgroup.procs", folder.rmdir


def timed(procs: Path, argv: list[str]) -> float:
    def enter() -> None:
        procs.write_text(f"{os.getpid()}\n")  # the child joins the cgroup before it execs

    start = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, check=True, preexec_fn=enter, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpus", type=float, default=1.0)
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    host = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp())
    checkpoint = bench_checkpoint(tmp)
    for name, rows in (("many.csv", args.rows), ("one.csv", 1)):
        with open(tmp / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text"])
            w.writerows([f"comment number {i}: is this acceptable?"] for i in range(rows))
    procs, cleanup = make_cgroup(args.cpus)
    try:
        check = subprocess.run(
            [sys.executable, "-c", "from moderation.core.cpus import available_cpus as a; "
             "print(a())"], cwd=ROOT, check=True, capture_output=True, text=True,
            preexec_fn=lambda: procs.write_text(f"{os.getpid()}\n"),
        )  # fmt: skip
        auto = int(check.stdout)
        times: dict[str, list[float]] = {"auto": [], "host": []}
        for _ in range(args.repeats):
            for label, extra in (("auto", []), ("host", ["--torch-threads", str(host)])):
                base = [sys.executable, "-m", "moderation", "batch", "--model", str(checkpoint),
                        "--text-column", "text", "--progress-interval", "0", *extra]  # fmt: skip
                many = timed(procs, [*base, str(tmp / "many.csv"), "-o", str(tmp / "o1.csv")])
                one = timed(procs, [*base, str(tmp / "one.csv"), "-o", str(tmp / "o2.csv")])
                times[label].append(many - one)
    finally:
        cleanup()
    a, h = statistics.median(times["auto"]), statistics.median(times["host"])
    print(f"{machine()}; here (outside the cgroup) {available_cpus()} CPUs")
    print(f"cgroup quota {args.cpus:g} CPUs on a {host}-core host; default threads there: {auto}")
    print(f"{args.rows} rows: default ({auto} threads) {a:.2f} s, host cores ({host} threads) "
          f"{h:.2f} s; host / default = {h / a:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
