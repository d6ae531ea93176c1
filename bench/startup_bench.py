"""A server's model start-up: the load, then the policy prefixes it pre-fills before SERVING.

Compares the default (the default policy's prefixes, and those of the policy and thresholds
files: none here) with `--warm-policies all` (every policy's, what start-up did before), each
in a fresh process (`moderation.serving.worker.loader.load_from_settings`, as the server and
the model process load), rounds alternating. Prints the seconds of the load and of the
pre-fill, the prefixes and tokens pre-filled, the memory they hold, and the process's RSS after
the load and after the pre-fill. `--shape 7b`: Mistral 7B's layer structure at tiny widths
(32 layers, 8 KV heads of 128: the 7B's cache rows, 128 KiB a token in bf16), as
bench/engine_7b_bench.py builds it.

    python bench/startup_bench.py [--shape demo|7b] [--dtype float32|bfloat16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MiB = 1 << 20
WARM = {"default": (), "all": ("all",)}


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def structure_7b_checkpoint() -> Path:
    from bench.engine_7b_bench import STRUCTURE_7B, checkpoint

    root = Path(tempfile.gettempdir()) / "moderation-startup-bench"
    folder = root / "structure-7b-hf"
    if not (folder / "tokenizer.model").exists():
        checkpoint(root, STRUCTURE_7B)
    return folder


def child(model: str | None, dtype: str, warm: str) -> None:
    """One start-up in this process; prints its figures as one JSON line."""
    import torch

    from moderation.serving.settings import ServeSettings
    from moderation.serving.worker import loader

    torch.set_num_threads(1)  # a shared machine: one thread, the least noisy
    settings = ServeSettings(
        model=model,
        device="cpu",
        dtype=dtype,
        max_batch_size=2,
        max_context=4096,
        model_process=False,
        warm_policies=WARM[warm],
    )
    loaded: dict[str, float] = {}
    load = loader.load

    def timed_load(s: object) -> object:
        start = time.perf_counter()
        runtime = load(s)  # type: ignore[arg-type]
        loaded.update(seconds=time.perf_counter() - start, rss=rss_mib())
        return runtime

    loader.load = timed_load  # type: ignore[assignment]
    start = time.perf_counter()
    runtime = loader.load_from_settings(settings)
    total = time.perf_counter() - start
    classifier = runtime.classifier
    figures = {
        "load_s": loaded["seconds"],
        "prefill_s": total - loaded["seconds"],
        "prefixes": len(classifier.cached_prefixes),
        "tokens": sum(len(p) for p in classifier.cached_prefixes),
        "prefix_mib": classifier.prefix_cache_bytes / MiB,
        "rss_loaded_mib": loaded["rss"],
        "rss_after_mib": rss_mib(),
    }
    print(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=["demo", "7b"], default="demo")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=list(WARM), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model, args.dtype, args.child)
        return
    model = [] if args.shape == "demo" else ["--model", str(structure_7b_checkpoint())]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in WARM}
    for round_ in range(args.rounds):
        order = list(WARM) if round_ % 2 == 0 else list(reversed(WARM))
        for warm in order:
            command = [sys.executable, __file__, "--child", warm, "--dtype", args.dtype, *model]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            runs[warm].append(json.loads(out.strip().splitlines()[-1]))
    from bench.common import machine

    print(f"# start-up, {args.shape} shape, {args.dtype}, median of {args.rounds}; {machine()}")
    keys = list(runs["default"][0])
    print(f"{'warm policies':14}" + "".join(f"{k:>15}" for k in keys))
    for warm, figures in runs.items():
        medians = [statistics.median(f[k] for f in figures) for k in keys]
        print(f"{warm:14}" + "".join(f"{m:15.2f}" for m in medians))


if __name__ == "__main__":
    main()
