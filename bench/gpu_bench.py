"""What the GPU check measures with (bench/gpu_measure.py): random weights made on the
device, a host-sync counter, pre-fill FLOPs, and decode steps timed at a fixed batch. Imports
torch and the engine only.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model import Engine, GenerationRequest, ModelArgs
from model.transformer import Transformer


class HostSyncCounter(TorchDispatchMode):
    """Counts the ops that make the host wait for the device: reading a scalar
    (`aten._local_scalar_dense`: .item(), int(), bool()), device-to-host copies (.cpu(),
    .tolist()), and `nonzero` (its output size depends on the data). Host-to-device copies
    are counted too (per-step metadata uploads), though they do not wait for the device."""

    def __init__(self, device_type: str = "cuda"):
        super().__init__()
        self.device_type = device_type
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        on_device = first is not None and first.device.type == self.device_type
        if name == "_local_scalar_dense" and on_device:
            self.counts["item"] += 1
        elif name == "nonzero" and on_device:
            self.counts["nonzero"] += 1
        elif name in ("_to_copy", "copy_") and first is not None:
            src, dst = (args[1], first) if name == "copy_" else (first, out)
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor):
                if src.device.type == self.device_type and dst.device.type == "cpu":
                    self.counts["device_to_host"] += 1
                elif src.device.type == "cpu" and dst.device.type == self.device_type:
                    self.counts["host_to_device"] += 1
        return out

    @property
    def syncs(self) -> int:
        return self.counts["item"] + self.counts["nonzero"] + self.counts["device_to_host"]


def count_host_syncs(fn: Callable[[], Any], device_type: str = "cuda") -> Counter[str]:
    """Counts of host-sync ops (see HostSyncCounter) while fn runs; "syncs" is their sum."""
    with HostSyncCounter(device_type) as counter:
        fn()
    counts = Counter(counter.counts)
    counts["syncs"] = counter.syncs
    return counts


def random_model(
    args: ModelArgs, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> Transformer:
    """Random weights made where the model runs (no 14 GB host round trip for the 7B): matrices
    of std 1/sqrt(fan_in), unit-scale embeddings, norms near 1 (as model.demo.random_weights,
    which needs safetensors; this needs torch alone)."""
    with torch.device("meta"):
        model = Transformer(args)
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, p in model.state_dict().items():  # consolidated names (the split hook)
        t = torch.empty(p.shape, device=device, dtype=dtype)
        if t.dim() == 1:
            t.normal_(1.0, 0.1, generator=gen)
        else:
            t.normal_(0.0, 1.0 if name == "tok_embeddings.weight" else t.shape[-1] ** -0.5,
                      generator=gen)  # fmt: skip
        state[name] = t
    model.load_state_dict(state, assign=True)  # q/k/v and w1/w3 fused by the load hook
    return model.eval()


def prefill_flops(args: ModelArgs, n_tokens: int, window: int) -> float:
    """Matmul FLOPs of a pre-fill: 2 per weight per token, plus QK^T and PV over the keys each
    query sees (logits only for the last token)."""
    per_layer = args.dim * (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
    per_layer += args.n_heads * args.head_dim * args.dim + 3 * args.dim * args.hidden_dim
    keys = sum(min(i + 1, window) for i in range(n_tokens))
    attention = 4 * args.n_layers * args.n_heads * args.head_dim * keys
    return 2.0 * args.n_layers * per_layer * n_tokens + attention + 2 * args.dim * args.vocab_size


def decode_rate(engine: Engine, batch: int, context: int, steps: int = 24) -> float:
    """Median seconds of a decode step of exactly `batch` sequences at about `context` tokens:
    every sequence pre-filled and decoding before the timed steps, none finishing during them
    (the batch is held fixed), then all cancelled."""
    warm = 3
    g = torch.Generator().manual_seed(batch * 7919 + context)
    vocab = engine.args.vocab_size
    new = steps + warm + 2
    ids = [
        engine.add_request(GenerationRequest(
            torch.randint(3, vocab, (context - new,), generator=g).tolist(), new,
            stop_tokens=frozenset(),
        ))
        for _ in range(batch)
    ]  # fmt: skip
    # Pre-fill (a step samples one token per sequence once every prompt is in).
    while len(engine.step()) < batch or engine.num_waiting:
        pass
    for _ in range(warm):
        engine.step()
    times = []
    for _ in range(steps):
        sync(engine)
        start = time.perf_counter()
        events = engine.step()
        sync(engine)
        times.append(time.perf_counter() - start)
        if len(events) != batch:
            raise RuntimeError(f"the batch changed while timed: {len(events)} of {batch}")
    for i in ids:
        engine.cancel(i)
    return statistics.median(times)


def sync(engine: Engine) -> None:
    if engine.model.device.type == "cuda":
        torch.cuda.synchronize()


def decode_bytes(engine: Engine, batch: int, context: int) -> int:
    """Bytes a decode step must read at least: every weight but the embedding table (of which
    it reads one row per sequence), and each sequence's cached keys and values (its window at
    most)."""
    args, element = engine.args, engine.model.tok_embeddings.weight.element_size()
    embeddings = (args.vocab_size - batch) * args.dim * element
    kv = batch * min(context, engine.window) * engine.memory.bytes_per_token
    return engine.memory.weights_bytes - embeddings + kv
