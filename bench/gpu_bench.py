"""The 7B shape on one GPU with random bf16 weights made on the device: the memory plan (and
the measured activation peak against its estimate), pre-fill and decode against the chip's
limits, host syncs per decode step, and flash-attn parity with SDPA when flash-attn imports.

    PYTHONPATH=. python bench/gpu_bench.py [--peak-tflops 790] [--peak-tbps 4.8]
    PYTHONPATH=. python bench/gpu_bench.py --plan-only   # the 7B memory plans, no GPU needed

The yardsticks default to an H200: about 790 TFLOP/s dense bf16 and 4.8 TB/s. Decode is
bandwidth bound (every step reads all weights and each sequence's cached window), pre-fill
compute bound (2 FLOPs per weight per token, plus attention).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model import Engine, GenerationRequest, ModelArgs
from model.args import MISTRAL_7B
from model.attention import flash_import_error
from model.errors import MemoryBudgetError
from model.memory import GiB, activation_bytes, cache_rows, cuda_budget, plan_memory
from model.transformer import Transformer

SEVEN_B = MISTRAL_7B
SEVEN_B_V02 = ModelArgs(**{**MISTRAL_7B.to_params(), "sliding_window": None, "rope_theta": 1e6})
BF16_WEIGHTS = 14_483_464_192  # 7,241,732,096 parameters


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


def random_model(args: ModelArgs) -> Transformer:
    """Random bf16 weights made on the GPU (no 14 GB host round trip)."""
    with torch.device("meta"):
        model = Transformer(args)
    state = {}
    for name, p in model.state_dict().items():
        t = torch.empty(p.shape, device="cuda", dtype=torch.bfloat16)
        if t.dim() == 1:
            t.fill_(1.0)
        else:
            t.normal_(0.0, t.shape[-1] ** -0.5)
        state[name] = t
    model.load_state_dict(state, assign=True)
    return model.eval()


def timed(fn: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def seven_b_plans(cards: dict[str, int], max_context: int = 8192) -> list[str]:
    """The plans the engine makes at the 7B shapes for each card (total bytes), as the service
    asks by default (32 + 32 slots, 8192 context), with SDPA's materialised scores."""
    lines = []
    for name, args in (("v0.1 (window 4096)", SEVEN_B), ("v0.2 (no window)", SEVEN_B_V02)):
        rows = cache_rows(args, max_context)[0]
        act = activation_bytes(args, torch.bfloat16, step_tokens=4096,
                               chunk_tokens=min(rows, 4096), rows=rows, sequences=32,
                               logits_rows=32 + 32 * 32)  # fmt: skip
        for card, total in cards.items():
            budget = cuda_budget(total=total, free=total - BF16_WEIGHTS - GiB // 2,
                                 weights=BF16_WEIGHTS, utilization=0.9)  # fmt: skip
            try:
                plan = plan_memory(args, torch.bfloat16, max_context=max_context,
                                   budget_bytes=budget, weights_bytes=BF16_WEIGHTS,
                                   activation_bytes=act, max_batch_size=32,
                                   score_batch_size=32)  # fmt: skip
                what = (f"{plan.generation_slots} + {plan.scoring_slots} slots x "
                        f"{plan.tokens_per_slot} tokens, cache {plan.cache_bytes / GiB:.1f} GiB, "
                        f"activations {act / GiB:.1f} GiB")  # fmt: skip
            except MemoryBudgetError as exc:
                what = f"refused: {exc}"
            lines.append(f"7B {name} on {card}, context {max_context}: {what}")
    return lines


def decode_steps(engine: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, int]:
    """Seconds and steps of the decode phase (the pre-fill step excluded)."""
    for p in prompts:
        engine.add_request(GenerationRequest(p, new_tokens, stop_tokens=frozenset()))
    while any(s.prefilling or not s.generated for s in engine._running.values()) or (
        engine.num_waiting
    ):
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    torch.cuda.synchronize()
    return time.perf_counter() - start, steps


def prefill_flops(args: ModelArgs, n_tokens: int, window: int) -> float:
    """Matmul FLOPs of a pre-fill: 2 per weight per token, plus QK^T and PV over the keys each
    query sees (logits only for the last token)."""
    per_layer = args.dim * (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
    per_layer += args.n_heads * args.head_dim * args.dim + 3 * args.dim * args.hidden_dim
    keys = sum(min(i + 1, window) for i in range(n_tokens))
    attention = 4 * args.n_layers * args.n_heads * args.head_dim * keys
    return 2.0 * args.n_layers * per_layer * n_tokens + attention + 2 * args.dim * args.vocab_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak-tflops", type=float, default=790.0)
    parser.add_argument("--peak-tbps", type=float, default=4.8)
    parser.add_argument("--prefill-tokens", type=int, default=8192)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--plan-only", action="store_true", help="print the 7B plans and stop")
    ns = parser.parse_args()
    cards = {"80 GB": 80 * 10**9, "40 GB": 40 * 10**9}
    if torch.cuda.is_available():
        cards[torch.cuda.get_device_name()] = torch.cuda.mem_get_info()[1]
    for line in seven_b_plans(cards):
        print(line)
    if ns.plan_only:
        return
    if not torch.cuda.is_available():
        print("SKIP 7B on the GPU: CUDA absent")
        return
    model = random_model(SEVEN_B)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"# 7B shape, {weight_bytes / 2 / 1e9:.2f}B params bf16, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"flash-attn: {flash_import_error() or 'imports'}")  # fmt: skip
    engine = Engine(model, max_batch_size=32, score_batch_size=32, max_context=8192)
    plan = engine.memory
    print(f"engine: backend {engine.backend.name}; {plan.describe()}")

    g = torch.Generator().manual_seed(0)
    vocab = SEVEN_B.vocab_size
    tokens = torch.randint(3, vocab, (ns.prefill_tokens,), generator=g).tolist()

    def prefill() -> None:
        engine.cache.reset(0)
        engine.passes.prefill([0], [tokens])

    prefill()  # warm-up
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t = timed(prefill)
    peak = torch.cuda.max_memory_allocated() - base
    print(f"activation peak of a {engine.max_step_tokens}-token chunk over a full window: "
          f"measured {peak / GiB:.2f} GiB, estimated {plan.activation_bytes / GiB:.2f} GiB "
          f"({peak / plan.activation_bytes:.0%} of the estimate)")  # fmt: skip
    flops = prefill_flops(SEVEN_B, ns.prefill_tokens, engine.window)
    print(f"pre-fill {ns.prefill_tokens} tokens: {ns.prefill_tokens / t:,.0f} tok/s, "
          f"{flops / t / 1e12:.0f} TFLOP/s = {flops / t / (ns.peak_tflops * 1e12):.0%} of "
          f"{ns.peak_tflops:.0f}")  # fmt: skip
    engine.cache.reset(0)

    for batch, prompt_len in ((1, 128), (32, 128), (32, 4000)):
        if batch > engine.max_batch_size:
            continue
        prompts = [torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
                   for _ in range(batch)]  # fmt: skip
        decode_steps(engine, prompts, 4)  # warm-up
        seconds, steps = decode_steps(engine, prompts, ns.new_tokens)
        per_step = seconds / steps
        mean_len = prompt_len + ns.new_tokens / 2
        kv = batch * min(mean_len, engine.window) * plan.bytes_per_token
        moved = weight_bytes + kv
        frac = moved / per_step / (ns.peak_tbps * 1e12)
        print(f"decode batch {batch:2d}, {prompt_len}-token prompts: {batch / per_step:,.0f} "
              f"tok/s ({per_step * 1e3:.2f} ms/step); weights + KV {moved / 1e9:.1f} GB/step "
              f"= {moved / per_step / 1e12:.2f} TB/s = {frac:.0%} of {ns.peak_tbps}")  # fmt: skip

    prompts = [torch.randint(3, vocab, (64,), generator=g).tolist() for _ in range(8)]
    for p in prompts:
        engine.add_request(GenerationRequest(p, 40, stop_tokens=frozenset()))
    for _ in range(3):
        engine.step()  # pre-fill and first tokens
    steps = 8
    counts = count_host_syncs(lambda: [engine.step() for _ in range(steps)])
    per = {k: counts[k] / steps for k in ("syncs", "item", "device_to_host", "nonzero",
                                          "host_to_device")}  # fmt: skip
    print(f"host syncs per decode step (batch 8): {per['syncs']:.1f} (item {per['item']:.1f}, "
          f"device->host {per['device_to_host']:.1f}, nonzero {per['nonzero']:.1f}); "
          f"host->device copies {per['host_to_device']:.1f} per step")  # fmt: skip
    while engine.has_unfinished():
        engine.step()

    if flash_import_error() is None:
        prompt = torch.randint(3, vocab, (3 * 4096 // 2,), generator=g).tolist()
        rows = list(range(0, len(prompt), 97))
        logits = {}
        for name in ("flash", "sdpa"):
            e = Engine(model, max_batch_size=1, score_batch_size=1, backend=name,
                       max_context=8192)  # fmt: skip
            logits[name] = e.passes.forward([0], [prompt], logits_rows=rows)
            del e
        diff = (logits["flash"] - logits["sdpa"]).abs().max().item()
        scale = logits["sdpa"].abs().max().item()
        print(f"flash vs sdpa logits: max |diff| {diff:.3e} (logit scale {scale:.1f})")
    else:
        print(f"SKIP flash vs sdpa: {flash_import_error()}")


if __name__ == "__main__":
    main()
