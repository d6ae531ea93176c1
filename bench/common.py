"""Shared pieces of the benchmarks: the ~60M-parameter config, its checkpoint, timing."""

from __future__ import annotations

import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from model import ModelArgs
from model.demo import random_weights
from model.tokenizer import mistral_common_tokenizer_path
from model.weights import save_consolidated, save_hf

# The benchmark model: dim 512, 8 layers, 8 heads, 2 KV heads, hidden 1792,
# vocab 32000, window 256 (about 60M parameters, two thirds of them embeddings).
BENCH_ARGS = ModelArgs(
    dim=512,
    n_layers=8,
    head_dim=64,
    hidden_dim=1792,
    n_heads=8,
    n_kv_heads=2,
    norm_eps=1e-5,
    vocab_size=32000,
    rope_theta=10000.0,
    sliding_window=256,
    max_seq_len=8192,
)


def bench_checkpoint(root: Path, *, layout: str = "consolidated") -> Path:
    """Write the benchmark checkpoint (random weights, real v1 tokenizer) once under root."""
    folder = root / f"bench-60m-{layout}"
    if not (folder / "tokenizer.model").exists():
        state = random_weights(BENCH_ARGS, seed=0)
        if layout == "hf":
            save_hf(folder, BENCH_ARGS, state)
        else:
            save_consolidated(folder, BENCH_ARGS, state)
        shutil.copyfile(mistral_common_tokenizer_path("v1"), folder / "tokenizer.model")
    return folder


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` runs after one warm-up: the least noisy estimate on a shared CPU."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {load:.2f}"
