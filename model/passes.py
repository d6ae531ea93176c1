"""The engine's forward passes over its cache slots: what generation, scoring and stream checks
share.

`Passes` plans a pass over some cache slots (model/cache.py), runs it (the compiled decode
step where there is one) and counts it; it also checks request tokens and lengths against the
model. `SlotPool` is the generation slots, lowest first, which generation and stream checks
take from. The engine (model/engine.py) builds one of each and hands them to its scoring
(model/scoring.py) and stream checks (model/stream_checks.py).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence

import torch

from model.attention import AttentionBackend
from model.cache import ForwardMetadata, RollingCache
from model.errors import RequestError
from model.graphs import DecodeGraphs
from model.stats import EngineStats
from model.transformer import Transformer


class SlotPool:
    """Free cache slots, kept sorted and taken lowest first, so running sequences tend to sit
    in consecutive slots and the decode path reads the cache as a view."""

    def __init__(self, slots: range):
        self._free = list(slots)

    def __len__(self) -> int:
        return len(self._free)

    def take(self) -> int | None:
        """The lowest free slot, or None when none is free."""
        return self._free.pop(0) if self._free else None

    def give(self, slot: int) -> None:
        bisect.insort(self._free, slot)


class Passes:
    """Forward passes of a model over its rolling cache (see the module docstring)."""

    def __init__(
        self,
        model: Transformer,
        cache: RollingCache,
        backend: AttentionBackend,
        stats: EngineStats,
        *,
        chunk_size: int,
        max_step_tokens: int,
        max_context: int | None,
        decode_step: DecodeGraphs | None = None,
    ):
        self.model = model
        self.cache = cache
        self.backend = backend
        self.stats = stats
        self.chunk_size = chunk_size
        self.max_step_tokens = max_step_tokens
        # Sequences longer than this are refused; None (a sliding window, no limit given): any.
        self.max_context = max_context
        # Decode steps as captured graphs (model/graphs.py), where the engine compiles them.
        self.decode_step = decode_step

    def forward(
        self,
        slots: list[int],
        chunks: list[Sequence[int]],
        *,
        logits_rows: list[int],
        write: list[bool] | None = None,
        trees: list[tuple[list[int], torch.Tensor] | None] | None = None,
        hidden: bool = False,
    ) -> torch.Tensor:
        """One pass of `chunks` (new tokens per slot): logits (or hidden states) of the packed
        `logits_rows`. See RollingCache.plan for `write` and `trees`."""
        graphs = self.decode_step
        if graphs is not None and graphs.serves(chunks, write, trees, hidden):
            self.stats.forward_passes += 1
            self.stats.tokens_computed += len(chunks)
            return graphs.decode(slots, [c[0] for c in chunks], logits_rows)
        tokens = list(itertools.chain.from_iterable(chunks))
        meta = self.cache.plan(
            slots,
            [len(c) for c in chunks],
            tokens=tokens,
            logits_rows=logits_rows,
            write=write,
            trees=trees,
        )
        return self.run_planned(meta, hidden=hidden)

    def run_planned(self, meta: ForwardMetadata, *, hidden: bool = False) -> torch.Tensor:
        """The forward of a planned pass: logits (or hidden states) of `meta.logits_index`."""
        self.backend.prepare(meta, self.model.dtype)
        assert meta.tokens is not None
        self.stats.forward_passes += 1
        self.stats.tokens_computed += int(meta.tokens.numel())
        return self.model(
            meta.tokens,
            meta,
            self.cache,
            logits_index=meta.logits_index,
            backend=self.backend,
            hidden=hidden,
        )

    def prefill(self, slots: list[int], prompts: list[Sequence[int]]) -> None:
        """Feed whole prompts into their slots, chunk by chunk, all slots in each pass."""
        offsets = [0] * len(prompts)
        while True:
            batch: list[tuple[int, Sequence[int], int]] = []
            budget = self.max_step_tokens
            for i, (slot, prompt, off) in enumerate(zip(slots, prompts, offsets, strict=True)):
                if off < len(prompt) and (budget > 0 or not batch):
                    chunk = prompt[off : off + min(self.chunk_size, max(budget, 1))]
                    batch.append((slot, chunk, i))
                    budget -= len(chunk)
            if not batch:
                return
            self.forward([b[0] for b in batch], [b[1] for b in batch], logits_rows=[])
            for _, chunk, i in batch:
                offsets[i] += len(chunk)

    def check_tokens(self, tokens: Sequence[int], what: str) -> None:
        """RequestError naming `what` for a token outside the vocabulary."""
        vocab = self.model.args.vocab_size
        for t in tokens:
            if not 0 <= t < vocab:
                raise RequestError(f"{what}: token id {t} outside the vocabulary (0..{vocab - 1})")

    def check_length(self, n: int, what: str) -> None:
        """RequestError naming `what` for a sequence of n tokens longer than the context."""
        if self.max_context is not None and n > self.max_context:
            raise RequestError(f"{what}: {n} tokens exceed the context of {self.max_context}")
