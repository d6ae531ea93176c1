"""Compute ops of one decode step on the CUDA code path, counted on CPU: q/k/v and w1/w3 fused
(one matrix multiply each, every device) against the unfused path CUDA took before (three and
two), in the same run; and the 7B memory plans (--max-batch-size auto) on simulated cards.

On a GPU each compute op of an eager step is a kernel launch, and at batch 1 the 7B's step is
launch-bound. The CUDA path is the CPU's with plain GEMM weights (no oneDNN packing: one op per
matrix multiply either way), so the engine runs here with its weights left plain. The
unfused variant re-creates the old layers' forward over row views of the fused weights (the
same values: the same tokens, checked). Layers, heads, window and vocabulary are the 7B's,
the widths tiny: op counts do not depend on widths.

    python bench/decode_ops.py [--batches 1,32] [--steps 8] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine
from bench.gpu_bench import random_model
from bench.gpu_measure import SIMULATED
from bench.step_counts import StepCounter
from model import Engine, GenerationRequest
from model.args import MISTRAL_7B
from model.cpu_gemm import CpuGemmChoice
from model.memory import GiB, kv_bytes_per_token, plan_engine_memory, weights_bytes
from model.transformer import Attention, FeedForward, Transformer, apply_rope

# head_dim 8: 32 slots of a 4096-token window in 2 GiB of RAM.
STRUCTURE_7B = dataclasses.replace(MISTRAL_7B, dim=256, hidden_dim=512, head_dim=8)


def unfused_attention(self: Attention, x, freqs, meta, backend, cache, layer):  # type: ignore[no-untyped-def]
    """Attention.forward as CUDA ran it before q/k/v were fused: three GEMMs, two RoPE calls."""
    T, H, KV, D = x.shape[0], self.n_heads, self.n_kv_heads, self.head_dim
    w = self.wqkv.weight
    q = apply_rope(F.linear(x, w[: H * D]).view(T, H, D), freqs)
    k = apply_rope(F.linear(x, w[H * D : (H + KV) * D]).view(T, KV, D), freqs)
    v = F.linear(x, w[(H + KV) * D :]).view(T, KV, D)
    out = backend.attend(q, k, v, meta, cache, layer)
    return self.wo.forward(out.reshape(T, H * D))


def unfused_feed_forward(self: FeedForward, x: torch.Tensor) -> torch.Tensor:
    """FeedForward.forward before w1/w3 were fused: two GEMMs."""
    w1, w3 = self.w13.weight.chunk(2)
    return self.w2.forward(F.silu(F.linear(x, w1)) * F.linear(x, w3))


@contextlib.contextmanager
def unfused() -> Iterator[None]:
    saved = Attention.forward, FeedForward.forward
    Attention.forward = unfused_attention  # type: ignore[method-assign]
    FeedForward.forward = unfused_feed_forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        Attention.forward, FeedForward.forward = saved  # type: ignore[method-assign]


def cuda_path_engine(batch: int, dtype: torch.dtype) -> Engine:
    model = random_model(STRUCTURE_7B, "cpu", dtype, seed=0)
    # The GPU path's GEMMs: plain weights. pack_for_cpu keeps a model's first choice, so a
    # choice of nothing packed leaves every weight as it is.
    model.cpu_gemm = CpuGemmChoice((), 0.0)
    per_slot = STRUCTURE_7B.window * kv_bytes_per_token(STRUCTURE_7B, dtype)
    return Engine(model, max_batch_size=batch, score_batch_size=1,
                  cache_memory_bytes=(batch + 1) * per_slot)  # fmt: skip


def step_figures(engine: Engine, batch: int, steps: int) -> tuple[StepCounter, float, list[int]]:
    """Counts of one decode step of `batch` sequences, the median step time, and the tokens."""
    g = torch.Generator().manual_seed(batch)
    ids = [engine.add_request(GenerationRequest(
        torch.randint(3, 32000, (16,), generator=g).tolist(), steps + 3, stop_tokens=frozenset()))
        for _ in range(batch)]  # fmt: skip
    tokens = [ev.token for ev in engine.step()]  # pre-fill and the first tokens
    engine.step()
    with StepCounter() as counts:
        tokens += [ev.token for ev in engine.step()]
    times = []
    for _ in range(steps - 1):
        start = time.perf_counter()
        tokens += [ev.token for ev in engine.step()]
        times.append(time.perf_counter() - start)
    for i in ids:
        engine.cancel(i)
    return counts, statistics.median(times), tokens


def plans() -> list[str]:
    with torch.device("meta"):
        weights = weights_bytes(Transformer(MISTRAL_7B).to(torch.bfloat16))
    lines = []
    for name, total in SIMULATED.items():
        for asked in ("auto", 32):
            p = plan_engine_memory(
                MISTRAL_7B, torch.bfloat16, device="cuda:0", weights_bytes=weights,
                max_batch_size=asked, score_batch_size=asked, chunk_tokens=4096,
                step_tokens=4096, max_context=8192, device_total_bytes=total,
                device_free_bytes=total - weights - GiB // 2,
            )  # fmt: skip
            used = p.weights_bytes + p.activation_bytes + p.cache_bytes
            lines.append(
                f"{name}, --max-batch-size {asked}: {p.generation_slots} + {p.scoring_slots} "
                f"slots, {used / GiB:.1f} of {p.budget_bytes / GiB:.1f} GiB budget used; "
                f"activations {p.activation_bytes / GiB:.2f} GiB"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument(
        "--dtype",
        choices=("bf16", "fp32"),
        default="bf16",
        help="bf16: what the CUDA path runs (RoPE casts are ops there)",
    )
    ns = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[ns.dtype]
    torch.set_num_threads(1)
    print(f"# decode step on the CUDA code path, 7B structure (32 layers, 32/8 heads, window "
          f"4096, vocab 32000; widths tiny), {ns.dtype} on CPU; {machine()}")  # fmt: skip
    print(f"{'batch':>5} {'path':>8} {'compute ops':>12} {'views':>6} {'syncs':>6} "
          f"{'ms/step (CPU)':>14}")  # fmt: skip
    for batch in (int(b) for b in ns.batches.split(",")):
        engine = cuda_path_engine(batch, dtype)
        fused_counts, fused_t, fused_tokens = step_figures(engine, batch, ns.steps)
        with unfused():
            old_counts, old_t, old_tokens = step_figures(engine, batch, ns.steps)
        assert old_tokens == fused_tokens, "the unfused path gave other tokens"
        for name, c, t in (("unfused", old_counts, old_t), ("fused", fused_counts, fused_t)):
            print(f"{batch:5d} {name:>8} {c.ops:12d} {c.views:6d} {c.syncs:6d} {t * 1e3:14.2f}")
        saved = old_counts.ops - fused_counts.ops
        per_layer = saved / STRUCTURE_7B.n_layers
        share = fused_counts.ops / old_counts.ops
        print(
            f"      fused: {saved} fewer ops per step ({per_layer:.0f} per layer), "
            f"{share:.0%} of before; same tokens"
        )
    print("# 7B memory plans (bf16, context 8192)")
    for line in plans():
        print(line)


if __name__ == "__main__":
    main()
