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

import dataclasses
import os
from collections.abc import Callable

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
# `max_batch_size="auto"`: the most slots of each kind sized from the budget (vLLM's default
# max_num_seqs), and what auto means off CUDA (the service's default before auto).
AUTO = "auto"
AUTO_CEILING = 256
AUTO_ELSEWHERE = 32


@dataclasses.dataclass(frozen=True)
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
    auto_ceiling: int | None = None  # slots sized from the budget ("auto"), at most this many

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
            f"({self._asked()}); "
            f"context {context}; budget {_size(self.budget_bytes)}"
        )
        if self.device_total_bytes is not None and self.device_free_bytes is not None:
            line += (
                f" (device {_size(self.device_total_bytes)} total, "
                f"{_size(self.device_free_bytes)} free at start-up)"
            )
        return line

    def _asked(self) -> str:
        if self.auto_ceiling is not None:
            return f"auto: as many as fit, at most {self.auto_ceiling} each"
        return f"asked {self.requested_generation_slots} + {self.requested_scoring_slots}"


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
    expanded_heads: bool = False,
) -> int:
    """Estimated peak of the temporaries of one pass (per layer; layers run one at a time).

    step_tokens new tokens in the pass, each sequence's chunk at most chunk_tokens, reading up
    to `rows` cached keys each; `sequences` of them gather their cached window. With
    materialised_scores (SDPA with a mask: its math kernel) the fp32 scores and probabilities
    of every query over its keys are counted; flash-attn never holds them. With
    expanded_heads (CUDA: SDPA's masked passes, which label-tree scoring passes are whatever
    the backend) the gathered keys and values are also copied padded per sequence and
    expanded to every query head for the memory-efficient kernel: for the 7B, 32 sequences
    of a 4096-token window, 2.6 GiB more.
    """
    e = torch.empty((), dtype=dtype, device="meta").element_size()
    T, C = step_tokens, min(chunk_tokens, step_tokens)
    H, KV, D = args.n_heads, args.n_kv_heads, args.head_dim
    hidden = T * args.dim * (4 * e + 8)  # residual, normed (fp32 inside), attention/FFN outputs
    qkv = T * (H + 2 * KV) * D * e + T * (H + KV) * D * (8 + e)  # projections, RoPE in fp32
    keys = (T + sequences * rows) * KV * D * e * 4  # K and V gathered, then put in order
    attn = T * H * D * e * 2
    scores = H * T * (C + rows) * 8 if materialised_scores else 0
    # Padded per sequence (KV heads), then expanded to all H heads, K and V each.
    expanded = (T + sequences * rows) * (KV + H) * D * e * 2 if expanded_heads else 0
    ffn = T * args.hidden_dim * 4 * e  # w1|w3 outputs, SiLU, product
    logits = logits_rows * args.vocab_size * 4 * 2  # fp32 logits and their log-softmax
    return hidden + qkv + keys + attn + scores + expanded + ffn + logits


def engine_activation_bytes(
    args: ModelArgs,
    dtype: torch.dtype,
    *,
    generation_slots: int,
    scoring_slots: int,
    step_tokens: int,
    chunk_tokens: int,
    rows: int,
    cuda: bool,
) -> int:
    """activation_bytes of the engine's largest pass for these slot counts: a pass of every
    generation or every scoring slot (each reading its window), the sampled rows and up to 32
    label-tree nodes per scoring slot projected onto the vocabulary. On CUDA neither backend
    holds the scores (flash-attn never does; SDPA's masked passes are built for the
    memory-efficient kernel, which expands the heads)."""
    return activation_bytes(
        args,
        dtype,
        step_tokens=step_tokens,
        chunk_tokens=chunk_tokens,
        rows=rows,
        sequences=max(generation_slots, scoring_slots),
        logits_rows=generation_slots + 32 * scoring_slots,
        materialised_scores=not cuda,
        expanded_heads=cuda,
    )


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


def budget_bytes(
    *,
    weights: int,
    activations: int,
    gpu_memory_utilization: float,
    cache_memory_bytes: int | None,
    device_total: int | None,
    device_free: int | None,
) -> int:
    """Bytes for weights + activations + cache. CUDA (a device total and free given):
    `gpu_memory_utilization` of the device (see cuda_budget), capped by cache_memory_bytes
    when given. Elsewhere: cache_memory_bytes for the cache, by default min(25% of available
    RAM, 4 GiB)."""
    if device_total is not None and device_free is not None:
        budget = cuda_budget(total=device_total, free=device_free, weights=weights,
                             utilization=gpu_memory_utilization)  # fmt: skip
        if cache_memory_bytes is not None:
            budget = min(budget, weights + activations + cache_memory_bytes)
        return budget
    if cache_memory_bytes is None:
        cache_memory_bytes = default_cpu_cache_bytes(available_ram_bytes())
    return weights + activations + cache_memory_bytes


def device_memory(device: torch.device) -> tuple[int | None, int | None]:
    """(total, free) bytes of a CUDA device now; (None, None) elsewhere."""
    if device.type != "cuda":
        return None, None
    free, total = torch.cuda.mem_get_info(device)
    return total, free


def plan_engine_memory(
    args: ModelArgs,
    dtype: torch.dtype,
    *,
    device: str,
    weights_bytes: int,
    max_batch_size: int | str,
    score_batch_size: int | str,
    chunk_tokens: int,
    step_tokens: int,
    max_context: int | None,
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
    cache_memory_bytes: int | None = None,
    device_total_bytes: int | None = None,
    device_free_bytes: int | None = None,
) -> MemoryPlan:
    """The engine's plan: its activation estimate, its budget on this device (CUDA when the
    device's total and free bytes are given) and the slots that fit. A batch size of AUTO is
    sized from the budget (auto_slots, up to AUTO_CEILING) on CUDA, and is AUTO_ELSEWHERE on
    other devices. Pure arithmetic: tests plan the 7B on simulated cards."""
    for name, value in (("max_batch_size", max_batch_size), ("score_batch_size", score_batch_size)):
        if value != AUTO and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive integer or {AUTO!r}, got {value!r}")
    rows = cache_rows(args, max_context)[0]
    cuda = device_total_bytes is not None and device_free_bytes is not None

    def activations(generation: int, scoring: int) -> int:
        return engine_activation_bytes(args, dtype, generation_slots=generation,
                                       scoring_slots=scoring, step_tokens=step_tokens,
                                       chunk_tokens=chunk_tokens, rows=rows, cuda=cuda)  # fmt: skip

    def budget(act: int) -> int:
        return budget_bytes(
            weights=weights_bytes,
            activations=act,
            gpu_memory_utilization=gpu_memory_utilization,
            cache_memory_bytes=cache_memory_bytes,
            device_total=device_total_bytes,
            device_free=device_free_bytes,
        )

    generation = None if max_batch_size == AUTO else int(max_batch_size)
    scoring = None if score_batch_size == AUTO else int(score_batch_size)
    if not cuda:
        generation = AUTO_ELSEWHERE if generation is None else generation
        scoring = AUTO_ELSEWHERE if scoring is None else scoring
    elif generation is None or scoring is None:
        generation, scoring = auto_slots(args, dtype, max_context=max_context,
                                         budget_bytes=budget, weights_bytes=weights_bytes,
                                         activation_bytes=activations, generation=generation,
                                         scoring=scoring)  # fmt: skip
    act = activations(generation, scoring)
    plan = plan_memory(
        args,
        dtype,
        max_context=max_context,
        budget_bytes=budget(act),
        weights_bytes=weights_bytes,
        activation_bytes=act,
        max_batch_size=generation,
        score_batch_size=scoring,
        device=device,
        device_total_bytes=device_total_bytes,
        device_free_bytes=device_free_bytes,
    )
    auto = cuda and AUTO in (max_batch_size, score_batch_size)
    return dataclasses.replace(plan, auto_ceiling=AUTO_CEILING) if auto else plan


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


def auto_slots(
    args: ModelArgs,
    dtype: torch.dtype,
    *,
    max_context: int | None,
    budget_bytes: Callable[[int], int],
    weights_bytes: int,
    activation_bytes: Callable[[int, int], int],
    generation: int | None,
    scoring: int | None,
    ceiling: int = AUTO_CEILING,
) -> tuple[int, int]:
    """(generation, scoring) slots where those given as None are sized from the budget: the
    largest n <= ceiling such that n of each (with the others as given) fit, their cache and
    the activations of a pass over them (`activation_bytes(generation, scoring)`) within
    `budget_bytes(activations)`. At least 1 each; plan_memory then refuses what cannot run."""
    per_slot = cache_rows(args, max_context)[0] * kv_bytes_per_token(args, dtype)

    def counts(n: int) -> tuple[int, int]:
        return (n if generation is None else generation, n if scoring is None else scoring)

    def fits(n: int) -> bool:
        g, s = counts(n)
        act = activation_bytes(g, s)
        return weights_bytes + act + (g + s) * per_slot <= budget_bytes(act)

    lo, hi = 1, ceiling  # fits() shrinks as n grows: the largest n that fits, by bisection
    if not fits(lo):
        return counts(lo)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return counts(lo)
