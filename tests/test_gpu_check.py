"""bench/gpu_check.sh runs on a machine without CUDA: GPU parts skipped and said so, the
CPU-runnable parts pass, a summary is written; and the sync counter it relies on counts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from bench.gpu_bench import count_host_syncs

ROOT = Path(__file__).resolve().parent.parent


def test_sync_counter_counts_scalar_reads_nonzero_and_copies() -> None:
    x = torch.arange(5.0)
    counts = count_host_syncs(
        lambda: (x.sum().item(), torch.nonzero(x), x.to("meta")), device_type="cpu"
    )
    assert (counts["item"], counts["nonzero"], counts["syncs"]) == (1, 1, 2)


def test_gpu_check_runs_without_cuda_and_says_so(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        return  # on a GPU host the script is run for real, not from the test suite
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    summary = (tmp_path / "gpu_summary.md").read_text()
    assert done.returncode == 0, done.stdout + done.stderr + summary
    assert "CUDA available: no" in summary and "CUDA absent: the GPU parts are skipped" in summary
    assert "## environment: ok, with skips" in summary
    assert "SKIP cuda parity: CUDA absent" in summary
    assert "7B v0.1 (window 4096) on 80 GB, context 8192: 32 + 32 slots" in summary
    assert "SKIP 7B on the GPU: CUDA absent" in summary
    assert "FAIL" not in summary and "TIMEOUT" not in summary
