"""How much memory the engine may use, and how many cache slots fit in it.

Memory is weights + activations of the largest pass + slots x rows x bytes per token (K and V
of every layer: 128 KiB per token for the 7B in bf16). Rows per slot are the sliding window,
or the context limit for a model without one, never the model's 32k maximum by accident.
The slot count follows from a byte budget, as vLLM sizes its KV cache from
`gpu_memory_utilization`: on CUDA a fraction of the device's total memory for the whole
engine, less what others already hold; on CPU a budget for the cache itself.

Pure arithmetic (the 7B shapes are planned in tests without allocating them); only
`weights_bytes` and `available_ram_bytes` look at the live process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from model.args import ModelArgs
from model.errors import MemoryBudgetError

GiB = 1 << 30
# vLLM's default: the engine may use 90% of the device, weights and activations included.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
# CPU hosts run small models (or one 7B for a test): the cache gets a quarter of the RAM
# available at start-up, at most this.
DEFAULT_CPU_CACHE_BYTES = 4 * GiB
# One generation slot and one scoring slot: below this the engine cannot serve both.
MIN_SLOTS = 2


@dataclass(frozen=True)
class MemoryPlan:
    """Where the engine's memory goes; `Engine.memory` holds the one it started with."""

    device: str
    weights_bytes: int
    activation_bytes: int  # estimated peak of one pass (max_step_tokens tokens)
    budget_bytes: int  # for weights + activations + cache
    bytes_per_token: int  # K and V of every layer, for one cached position
    tokens_per_slot: int  # cache rows per slot: the window, or the context limit without one
    generation_slots: int
    scoring_slots: int
    requested_generation_slots: int
    requested_scoring_slots: int
    max_context: int | None  # longest sequence the engine accepts; None = unbounded (sliding)
    sliding: bool  # the rows are a rolling window (positions past it are overwritten)
    device_total_bytes: int | None = None  # CUDA: the device, at start-up
    device_free_bytes: int | None = None

    @property
    def slots(self) -> int:
        return self.generation_slots + self.scoring_slots

    @property
    def bytes_per_slot(self) -> int:
        return self.tokens_per_slot * self.bytes_per_token

    @property
    def cache_bytes(self) -> int:
        return self.slots * self.bytes_per_slot

    @property
    def scaled_down(self) -> bool:
        return self.slots < self.requested_generation_slots + self.requested_scoring_slots

    def describe(self) -> str:
        """One line for the start-up log."""
        context = "unbounded" if self.max_context is None else f"{self.max_context} tokens"
        line = (
            f"engine memory on {self.device}: weights {_size(self.weights_bytes)}, "
            f"activations {_size(self.activation_bytes)} (estimated), "
            f"kv cache {_size(self.cache_bytes)} = {self.slots} slots x {self.tokens_per_slot} "
            f"tokens x {_size(self.bytes_per_token)}; "
            f"slots {self.generation_slots} generation + {self.scoring_slots} scoring "
            f"(asked {self.requested_generation_slots} + {self.requested_scoring_slots}); "
            f"context {context}; budget {_size(self.budget_bytes)}"
        )
        if self.device_total_bytes is not None and self.device_free_bytes is not None:
            line += (
                f" (device {_size(self.device_total_bytes)} total, "
                f"{_size(self.device_free_bytes)} free at start-up)"
            )
        return line


def _size(n: int) -> str:
    """A byte count in the largest unit it reaches (the 7B's in GiB, a test model's in KiB)."""
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    if n >= 1 << 10:
        return f"{n / 1024:.0f} KiB"
    return f"{n} B"


def kv_bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
    """Bytes of K and V for one position in every layer (128 KiB for the 7B in bf16)."""
    element = torch.empty((), dtype=dtype, device="meta").element_size()
    return 2 * args.n_layers * args.n_kv_heads * args.head_dim * element


def cache_rows(args: ModelArgs, max_context: int | None) -> tuple[int, bool, int | None]:
    """(rows per slot, sliding, accepted context) for a context limit.

    Without a sliding window the rows are the context limit (the model's max_seq_len when
    None) and sequences may not outgrow them. With a window W the rows are W, and
    max_context only bounds what the engine accepts; a limit below W shrinks the rows to it
    (no accepted sequence reaches W, so the band mask is the same).
    """
    if max_context is not None and max_context < 1:
        raise ValueError(f"max_context must be positive, got {max_context}")
    if not args.sliding_window:
        rows = min(max_context or args.max_seq_len, args.max_seq_len)
        return rows, False, rows
    if max_context is not None and max_context < args.sliding_window:
        return max_context, False, max_context
    return args.sliding_window, True, max_context


def activation_bytes(
    args: ModelArgs,
    dtype: torch.dtype,
    *,
    step_tokens: int,
    chunk_tokens: int,
    rows: int,
    sequences: int,
    logits_rows: int,
    materialised_scores: bool = True,
) -> int:
    """Estimated peak of the temporaries of one pass (per layer; layers run one at a time).

    step_tokens new tokens in the pass, each sequence's chunk at most chunk_tokens, reading up
    to `rows` cached keys each; `sequences` of them gather their cached window. With
    materialised_scores (SDPA with a mask: its math kernel) the fp32 scores and probabilities
    of every query over its keys are counted; flash-attn never holds them.
    """
    e = torch.empty((), dtype=dtype, device="meta").element_size()
    T, C = step_tokens, min(chunk_tokens, step_tokens)
    H, KV, D = args.n_heads, args.n_kv_heads, args.head_dim
    hidden = T * args.dim * (4 * e + 8)  # residual, normed (fp32 inside), attention/FFN outputs
    qkv = T * (H + 2 * KV) * D * e + T * (H + KV) * D * (8 + e)  # projections, RoPE in fp32
    keys = (T + sequences * rows) * KV * D * e * 4  # K and V gathered, then put in order
    attn = T * H * D * e * 2
    scores = H * T * (C + rows) * 8 if materialised_scores else 0
    ffn = T * args.hidden_dim * 4 * e  # w1|w3 outputs, SiLU, product
    logits = logits_rows * args.vocab_size * 4 * 2  # fp32 logits and their log-softmax
    return hidden + qkv + keys + attn + scores + ffn + logits


def weights_bytes(model: nn.Module) -> int:
    """Bytes of a module's parameters, buffers and tensors held as plain attributes (the
    oneDNN-packed weights of pack_for_cpu), each storage counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    held = [t for m in model.modules() for t in vars(m).values() if isinstance(t, torch.Tensor)]
    for t in [*model.parameters(), *model.buffers(), *held]:
        if t.device.type == "meta" or t.is_mkldnn:  # no storage to share (mkldnn: opaque)
            total += t.numel() * t.element_size()
            continue
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
    return total


def available_ram_bytes() -> int:
    """MemAvailable (page cache that can be dropped included), or free pages elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_cpu_cache_bytes(available: int) -> int:
    """The CPU cache budget when none is given: a quarter of available RAM, at most 4 GiB."""
    return min(available // 4, DEFAULT_CPU_CACHE_BYTES)


def cuda_budget(*, total: int, free: int, weights: int, utilization: float) -> int:
    """Bytes for weights + activations + cache: `utilization` of the device, less what is held
    besides our weights (CUDA context, other processes), measured after the weights loaded."""
    if not 0.0 < utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    held_by_others = max(0, total - free - weights)
    return int(total * utilization) - held_by_others


def device_budget(
    device: torch.device,
    *,
    weights: int,
    activations: int,
    gpu_memory_utilization: float,
    cache_memory_bytes: int | None,
) -> tuple[int, int | None, int | None]:
    """(budget for weights + activations + cache, device total, device free) where the
    engine runs. CUDA: `gpu_memory_utilization` of the device (see cuda_budget), capped by
    cache_memory_bytes when given. Elsewhere: cache_memory_bytes for the cache, by default
    min(25% of available RAM, 4 GiB)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = cuda_budget(
            total=total, free=free, weights=weights, utilization=gpu_memory_utilization
        )
        if cache_memory_bytes is not None:
            budget = min(budget, weights + activations + cache_memory_bytes)
        return budget, total, free
    if cache_memory_bytes is None:
        cache_memory_bytes = default_cpu_cache_bytes(available_ram_bytes())
    return weights + activations + cache_memory_bytes, None, None


def plan_memory(
    args: ModelArgs,
    dtype: torch.dtype,
    *,
    max_context: int | None,
    budget_bytes: int,
    weights_bytes: int,
    activation_bytes: int,
    max_batch_size: int,
    score_batch_size: int,
    device: str = "cpu",
    device_total_bytes: int | None = None,
    device_free_bytes: int | None = None,
) -> MemoryPlan:
    """Slots that fit the budget, at most the ones asked for; MemoryBudgetError below two.

    When fewer fit, generation and scoring slots shrink in proportion, at least one each.
    """
    if max_batch_size < 1 or score_batch_size < 1:
        raise ValueError("max_batch_size and score_batch_size must be at least 1")
    rows, sliding, accepted = cache_rows(args, max_context)
    per_token = kv_bytes_per_token(args, dtype)
    per_slot = rows * per_token
    asked = max_batch_size + score_batch_size
    cache_budget = budget_bytes - weights_bytes - activation_bytes
    fit = max(0, cache_budget) // per_slot
    if fit < MIN_SLOTS:
        where = ""
        if device_total_bytes is not None and device_free_bytes is not None:
            where = (
                f"; device {_size(device_total_bytes)} total, {_size(device_free_bytes)} free "
                "after loading the weights"
            )
        raise MemoryBudgetError(
            f"the KV cache does not fit: {MIN_SLOTS} slots of {rows} tokens need "
            f"{_size(MIN_SLOTS * per_slot)} ({_size(per_slot)} per slot, "
            f"{_size(per_token)} per token), but the budget of {_size(budget_bytes)} "
            f"leaves {_size(max(0, cache_budget))} after weights {_size(weights_bytes)} and "
            f"activations {_size(activation_bytes)}{where}. Lower the context limit "
            "(max_context), or raise the memory budget"
        )
    generation, scoring = max_batch_size, score_batch_size
    if fit < asked:
        generation = min(max_batch_size, fit - 1, max(1, round(fit * max_batch_size / asked)))
        scoring = min(score_batch_size, fit - generation)
    return MemoryPlan(
        device=device,
        weights_bytes=weights_bytes,
        activation_bytes=activation_bytes,
        budget_bytes=budget_bytes,
        bytes_per_token=per_token,
        tokens_per_slot=rows,
        generation_slots=generation,
        scoring_slots=scoring,
        requested_generation_slots=max_batch_size,
        requested_scoring_slots=score_batch_size,
        max_context=accepted,
        sliding=sliding,
        device_total_bytes=device_total_bytes,
        device_free_bytes=device_free_bytes,
    )
