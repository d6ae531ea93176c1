"""Decode steps as compiled graphs, captured as CUDA graphs on CUDA, ready before serving.

A decode step of a 7B on a GPU is launch-bound in eager mode (hundreds of small kernels per
step); replayed as one CUDA graph it costs one launch. What makes that hold in serving (as in
vLLM and gpt-fast):

- **few shapes**: a step's batch is padded up to a bucket (1, 2, 4, ... and the batch cap);
  its decode span (rows read per slot) is already rounded to a power of two
  (`cache.decode_span`), and the span mask is always present, so a step's shape is one of
  `len(buckets) * len(spans)`. Padding rows are harmless decoders of their own: they write
  row j of a scoring slot (idle during a decode step: scoring runs between steps, never in
  them) and attend to one row of it; their logits are dropped.
- **every shape ready before SERVING**: `warm_up` runs each (bucket, span) at start-up (three
  times on CUDA: the cudagraph trees run a shape eagerly once, then record, then replay), so no
  caller's step ever waits for a compile or a capture. `capture_seconds` is what that took.
- **static buffers**: the cache is marked a static address, so the graphs write it in place.
- **no recompiles while serving**: `compiles` counts the step's graphs dynamo compiled during
  warm-up and `recompiles_since_warm_up()` those after it; tests drive a serving mix and
  assert zero.

The compiled function is `Transformer.run`: `fullgraph=True` (no Python between the ops of a
step; a graph break is an error, not a silent slow path). CUDA: inductor, mode
"reduce-overhead" (the CUDA graphs). CPU (tests): dynamo alone, backend "eager": inductor
cannot lower the oneDNN pre-packed GEMMs of the eager path and was measured slower without
them, and "aot_eager" functionalises each cache write into a copy of the whole cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

from model import transfer
from model.attention import AttentionBackend
from model.cache import RollingCache, decode_span
from model.transformer import Transformer

_log = logging.getLogger(__name__)


def batch_buckets(max_batch_size: int) -> list[int]:
    """Batch sizes a decode step is padded to: powers of two below the cap, and the cap."""
    out = [1]
    while out[-1] * 2 < max_batch_size:
        out.append(out[-1] * 2)
    if out[-1] != max_batch_size:
        out.append(max_batch_size)
    return out


def span_buckets(window: int) -> list[int]:
    """Decode spans a step can take (see cache.decode_span)."""
    return sorted({decode_span(n, window, True) for n in range(1, window + 1)})


def warm_up_prefill(score: Callable[[list[int], list[list[int]]], object], vocab: int) -> float:
    """Compile a generated pre-fill kernel (FlexAttention on CUDA) before serving: a scoring
    call runs a pre-fill chunk and a label tree (the kernel's two masks), at two lengths so
    that dynamo makes each shape-generic now rather than at a caller's second request.
    Returns the seconds taken."""
    start = time.perf_counter()
    for n in (8, 200):
        score([3 + i % (vocab - 3) for i in range(n)], [[3], [4, 5]])
    seconds = time.perf_counter() - start
    _log.info("pre-fill attention kernels compiled in %.1f s", seconds)
    return seconds


def _graph_count(fn: Callable[..., object]) -> int:
    """Graphs dynamo holds for fn's code (every engine's decode step shares Transformer.run's
    code, so counts are taken as differences). Not the process-wide counter: eager
    FlexAttention compiles a wrapper of its own per pre-fill shape, which is not a graph of
    the decode step."""
    code = getattr(fn, "__code__", None) or fn.__func__.__code__  # type: ignore[attr-defined]
    return len(_debug_get_cache_entry_list(code))


class DecodeGraphs:
    """The decode step of one engine, compiled per bucket and warmed before serving.

    `decode(slots, tokens, logits_rows)` serves a pass where every sequence adds one token and
    writes it (what `Engine.step` runs once the batch is pre-filled); other passes stay eager.
    """

    def __init__(
        self,
        model: Transformer,
        cache: RollingCache,
        backend: AttentionBackend,
        *,
        max_batch_size: int,
        pad_slot: int,
    ) -> None:
        self.model = model
        self.cache = cache
        self.backend = backend
        self.pad_slot = pad_slot
        self.buckets = batch_buckets(max_batch_size)
        self.spans = span_buckets(cache.window)
        self.cuda = cache.device.type == "cuda"
        cache.bucket_spans = True
        cache.static_steps = True
        # Room for every shape (and dynamo's automatic-dynamic recompiles) of this engine:
        # dynamo's default of 8 per function would stop a fullgraph step with a hard error.
        graphs = 2 * len(self.buckets) * len(self.spans) + 4
        config = torch._dynamo.config
        config.recompile_limit += graphs
        config.accumulated_recompile_limit += graphs
        self._step: Callable[..., torch.Tensor]
        if self.cuda:
            torch._dynamo.mark_static_address(cache.k)
            torch._dynamo.mark_static_address(cache.v)
            self._step = torch.compile(model.run, mode="reduce-overhead", fullgraph=True)
        else:
            self._step = torch.compile(model.run, backend="eager", fullgraph=True)
        self.capture_seconds = 0.0
        self.compiles = 0
        self._graphs_after_warm_up: int | None = None

    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"a decode step of {n} sequences exceeds the batch cap {self.buckets[-1]}")

    def serves(
        self,
        chunks: Sequence[Sequence[int]],
        write: list[bool] | None,
        trees: Sequence[object] | None,
        hidden: bool,
    ) -> bool:
        """Whether a pass is a pure decode step these graphs hold."""
        return (
            not hidden
            and trees is None
            and (write is None or all(write))
            and 0 < len(chunks) <= self.buckets[-1]
            and all(len(c) == 1 for c in chunks)
        )

    def decode(self, slots: list[int], tokens: list[int], logits_rows: list[int]) -> torch.Tensor:
        """Logits of `logits_rows` (packed rows, as Engine._forward takes them) of a decode
        step, run as the graph of its bucket."""
        n = len(slots)
        pad = self.bucket(n) - n
        meta = self.cache.plan(
            slots, [1] * n, tokens=tokens, pad=(pad, self.pad_slot) if pad else None
        )
        self.backend.prepare(meta, self.model.dtype)
        assert meta.tokens is not None
        if self.cuda:
            # The previous step's outputs are consumed: the cudagraph trees may reuse them.
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():
            logits = self._step(meta.tokens, meta, self.cache, None, self.backend, False)
        if logits_rows == list(range(n)):
            return logits[:n]
        index = transfer.upload(torch.tensor(logits_rows, dtype=torch.long), logits.device)
        return logits.index_select(0, index)

    def warm_up(self, free_slots: list[int]) -> float:
        """Compile (and on CUDA capture) every (bucket, span) shape; returns the seconds taken.

        Runs decode steps on the free generation slots (all of them at start-up), each with
        one slot's length set so that the step's span is the shape's, then forgets them: their
        rows are written with a token 0 the next occupant overwrites before reading."""
        if len(free_slots) < self.buckets[-1]:
            raise ValueError("warm_up needs every generation slot free")
        start = time.perf_counter()
        before = _graph_count(self.model.run)
        runs = 3 if self.cuda else 1
        for b in self.buckets:
            slots = free_slots[:b]
            for span in self.spans:
                for _ in range(runs):
                    for s in slots:
                        self.cache.reset(s)
                    # The longest sequence then holds `span` rows after its write.
                    self.cache.lengths[slots[0]] = span - 1
                    self.decode(slots, [0] * b, list(range(b)))
        for s in free_slots:
            self.cache.reset(s)
        if self.cuda:
            torch.cuda.synchronize(self.cache.device)
        self.capture_seconds = time.perf_counter() - start
        self.compiles = _graph_count(self.model.run) - before
        self._graphs_after_warm_up = _graph_count(self.model.run)
        _log.info(
            "decode graphs: %d batch buckets %s x %d spans ready in %.1f s (%d compiles%s)",
            len(self.buckets), self.buckets, len(self.spans), self.capture_seconds,
            self.compiles, ", captured as CUDA graphs" if self.cuda else "",
        )  # fmt: skip
        return self.capture_seconds

    def recompiles_since_warm_up(self) -> int:
        """Decode-step graphs dynamo compiled after warm_up (those of every engine in this
        process, which share the step's code)."""
        if self._graphs_after_warm_up is None:
            return 0
        return _graph_count(self.model.run) - self._graphs_after_warm_up
