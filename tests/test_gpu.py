"""The engine on CUDA against the same engine on CPU in fp32 (the checks of bench/gpu_parity.py,
through pytest), its memory plan from the device, and host syncs per decode step. Skipped with
a reason without CUDA; bench/gpu_check.sh runs them on a GPU host."""

from __future__ import annotations

import pytest
import torch

from bench.gpu_bench import count_host_syncs
from bench.gpu_parity import ARGS, build, make_engine, run
from model import GenerationRequest
from model.demo import random_weights

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_cuda_engine_matches_cpu_fp32_through_a_wrapping_window(dtype: str) -> None:
    checks = run("cuda", [dtype])
    failed = [c.line() for c in checks if c.ok is False]
    assert not failed, "\n".join(failed)


def test_cuda_engine_plans_memory_from_the_device() -> None:
    engine = make_engine(build(random_weights(ARGS, seed=1), "cuda", torch.bfloat16))
    plan = engine.memory
    total = torch.cuda.mem_get_info()[1]
    assert plan.device.startswith("cuda") and plan.device_total_bytes == total
    assert plan.slots == 6 and engine.cache.k.is_cuda
    assert engine.cache.nbytes == plan.cache_bytes
    assert plan.weights_bytes == sum(p.numel() * 2 for p in engine.model.parameters())


def test_host_syncs_per_decode_step_are_counted() -> None:
    engine = make_engine(build(random_weights(ARGS, seed=1), "cuda", torch.bfloat16))
    for n in (5, 9, 30):
        engine.add_request(GenerationRequest(list(range(3, 3 + n)), 40, stop_tokens=frozenset()))
    for _ in range(3):
        engine.step()
    steps = 10
    counts = count_host_syncs(lambda: [engine.step() for _ in range(steps)])
    print(f"host syncs per decode step: {counts['syncs'] / steps:.1f} ({dict(counts)})")
    # At least the sampled tokens come back each step; the design's goal is exactly that one.
    assert counts["syncs"] >= steps
