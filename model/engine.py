"""The batched engine: owns the model, the memory plan and the cache slots, and composes the
parts that use them.

`Passes` (model/passes.py) runs forward passes over the cache. Generation (model/generation.py)
is continuous batching over the generation slots: requests join and leave between steps, each
step one forward pass. Scoring (model/scoring.py) pre-fills prompts in chunks, then scores
every continuation of a prompt in one pass over a token tree, over slots of its own; a prompt
prefix used by many requests (a policy's instructions) is pre-filled once and restored. Stream
checks (model/stream_checks.py) score a growing text in generation slots. The engine's methods
are theirs, and `step_with_checks` runs a generation step and checks in one pass.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from model.attention import AttentionBackend, select_backend
from model.cache import RollingCache
from model.cpu_gemm import pack_for_cpu
from model.generation import Generation, GenerationRequest, TokenEvent
from model.graphs import DecodeGraphs, warm_up_prefill
from model.memory import (
    DEFAULT_GPU_MEMORY_UTILIZATION,
    cache_rows,
    device_memory,
    plan_engine_memory,
    weights_bytes,
)
from model.passes import Passes, SlotPool
from model.scoring import Prefix, ScoreRequest, Scoring
from model.stats import EngineStats
from model.stream_checks import StreamCheck, StreamChecks
from model.transformer import Transformer

_log = logging.getLogger(__name__)


class Engine:
    """Batched generation and scoring over a rolling-buffer cache.

    `max_batch_size` slots serve generation, `score_batch_size` more serve scoring, so a burst
    of classifications never waits for long generations to finish.

    Memory (see model/memory.py): each slot caches the sliding window, or `max_context` tokens
    for a model without one (None: the model's max_seq_len, 32k for Mistral 7B v0.2/v0.3;
    pass a limit such as 8192). With a window, `max_context` bounds accepted sequences.
    Requested slots are caps: fewer are made when the budget holds fewer (at least one of
    each; MemoryBudgetError below two). The budget: on CUDA `gpu_memory_utilization` of the
    device for weights + activations + cache; on CPU `cache_memory_bytes` for the cache
    (default min(25% of available RAM, 4 GiB)), which also caps the cache on CUDA when given.
    `memory` is the resulting MemoryPlan. `max_batch_size` / `score_batch_size` "auto": on
    CUDA as many slots as the budget holds, at most 256 of each (vLLM's default number of
    sequences); elsewhere 32.
    """

    def __init__(
        self,
        model: Transformer,
        *,
        max_batch_size: int | str = 8,
        score_batch_size: int | str = 16,
        chunk_size: int | None = None,
        max_step_tokens: int | None = None,
        max_context: int | None = None,
        gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
        cache_memory_bytes: int | None = None,
        backend: str | AttentionBackend = "auto",
        eos_id: int = 2,
        compile: bool | None = None,
        compile_on_cpu: bool = False,
    ):
        self.model = model
        self.args = model.args
        self.eos_id = eos_id
        # A name (auto, flash, flex, sdpa), or a backend built by the caller (for example
        # model.attention.flex_backend(device, flex_decode=True)).
        backend_choice = (
            select_backend(backend, model.device, model.dtype)
            if isinstance(backend, str)
            else backend
        )
        # Before pack_for_cpu, which adds at most a packed copy of the output projection (1.8%
        # of a 7B).
        weights = weights_bytes(model)
        # The CPU kernel of each matrix multiply, measured on this host and logged (None on
        # a GPU).
        self.cpu_gemm = pack_for_cpu(model) if model.device.type == "cpu" else None
        rows = cache_rows(model.args, max_context)[0]
        # Chunks of at most 4096 tokens (the 7B's window) bound activations for models whose
        # rows are a long context.
        self.chunk_size = chunk_size or min(rows, 4096)
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        # Tokens one forward pass may carry: bounds activation memory when many long prompts
        # arrive together (pre-fill of the rest continues in the next passes).
        self.max_step_tokens = max_step_tokens or max(self.chunk_size, 4096)
        total, free = device_memory(model.device)
        # Requested slots are caps: fewer when fewer fit, MemoryBudgetError below two; "auto"
        # sizes them from the budget on CUDA.
        self.memory = plan_engine_memory(
            model.args,
            model.dtype,
            device=str(model.device),
            weights_bytes=weights,
            max_batch_size=max_batch_size,
            score_batch_size=score_batch_size,
            chunk_tokens=self.chunk_size,
            step_tokens=self.max_step_tokens,
            max_context=max_context,
            gpu_memory_utilization=gpu_memory_utilization,
            cache_memory_bytes=cache_memory_bytes,
            device_total_bytes=total,
            device_free_bytes=free,
        )
        _log.log(logging.WARNING if self.memory.scaled_down else logging.INFO,
                 self.memory.describe())  # fmt: skip
        generation, scoring = self.memory.generation_slots, self.memory.scoring_slots
        self.cache = RollingCache.for_model(
            model.args,
            self.memory.slots,
            max_context=max_context,
            device=model.device,
            dtype=model.dtype,
        )
        self.window = self.cache.window
        # Sequences longer than this are refused; None (a sliding window, no limit given): any.
        self.max_context = self.memory.max_context
        self.max_batch_size = generation
        self.score_batch_size = scoring
        self.stats = EngineStats()
        # compile (None: on CUDA): decode steps run as compiled graphs over a few batch
        # buckets, captured as CUDA graphs on CUDA and all warmed here, before the engine
        # serves (model/graphs.py). On CPU the compiled step was measured slower than eager
        # (the eager kernels it keeps, plus dynamo's guards; no launch overhead for a graph to
        # remove), so compile=True declines there and says so; compile_on_cpu=True compiles
        # anyway (tests of the compiled step on a CPU machine).
        if compile is None:
            compile = model.device.type == "cuda"
        if compile and model.device.type == "cpu" and not compile_on_cpu:
            _log.warning(
                "compile: ignored on CPU, where the compiled decode step is slower than eager "
                "(it removes GPU launch overhead; docs/benchmarks.md); running eager"
            )
            compile = False
        self.compile = compile
        # The parts that share the cache: forward passes, the generation slots (which check
        # streams also take), scoring over its own slots, and stream checks.
        self.passes = Passes(
            model,
            self.cache,
            backend_choice,
            self.stats,
            chunk_size=self.chunk_size,
            max_step_tokens=self.max_step_tokens,
            max_context=self.max_context,
        )
        self._free_slots = SlotPool(range(generation))
        self.scoring = Scoring(self.passes, range(generation, generation + scoring))
        self.stream_checks = StreamChecks(self.passes, self.scoring, self._free_slots)
        self.generation = Generation(self.passes, self._free_slots, eos_id=eos_id)
        if compile:
            # Padding decoders use the last scoring slot, idle during a decode step.
            graphs = DecodeGraphs(
                model, self.cache, backend_choice, max_batch_size=generation,
                pad_slot=self.scoring.slots[-1],
            )  # fmt: skip
            graphs.warm_up(list(range(generation)))
            self.passes.decode_step = graphs
        # The compiled FlexAttention kernel (CUDA) likewise, before the first caller waits.
        self.prefill_compile_seconds = 0.0
        if model.device.type == "cuda" and getattr(backend_choice, "compile_kernel", False):
            self.prefill_compile_seconds = warm_up_prefill(self.score, self.args.vocab_size)

    @property
    def graph_capture_seconds(self) -> float | None:
        """Start-up time spent compiling and capturing the decode graphs; None without."""
        graphs = self.passes.decode_step
        return graphs.capture_seconds if graphs is not None else None

    @property
    def graph_recompiles(self) -> int | None:
        """Decode-step graphs compiled since the start-up warm-up (goal: 0); None without."""
        graphs = self.passes.decode_step
        return graphs.recompiles_since_warm_up() if graphs is not None else None

    @property
    def graph_batch_sizes(self) -> tuple[int, ...]:
        """Batch sizes decode steps are padded to and run as graphs; () when eager."""
        graphs = self.passes.decode_step
        return tuple(graphs.buckets) if graphs is not None else ()

    @property
    def backend(self) -> AttentionBackend:
        """The attention backend of every pass (settable: tests run both SDPA paddings)."""
        return self.passes.backend

    @backend.setter
    def backend(self, backend: AttentionBackend) -> None:
        self.passes.backend = backend

    # ----------------------------------------------------- scoring and checks

    def prefill_prefix(self, tokens: Sequence[int]) -> Prefix:
        """Pre-fill a prompt prefix once; ScoreRequests carrying it skip those tokens."""
        return self.scoring.prefill_prefix(tokens)

    def score(self, prompt: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[float]:
        """Summed log-probability of each continuation given the prompt."""
        return self.scoring.score(prompt, continuations)

    def score_batch(
        self, requests: Sequence[ScoreRequest], *, relative: bool = False
    ) -> list[list[float]]:
        """Scoring.score_batch: many prompts, `score_batch_size` at a time."""
        return self.scoring.score_batch(requests, relative=relative)

    @property
    def free_slots(self) -> int:
        """Generation slots free now (a check stream takes one)."""
        return len(self._free_slots)

    def open_stream(self, prompt: Sequence[int], prefix: Prefix | None = None) -> int | None:
        """Start a check stream (StreamChecks.open_stream); None when no slot is free now."""
        return self.stream_checks.open_stream(prompt, prefix)

    def close_stream(self, stream_id: int) -> bool:
        """Free a check stream's slot; False if unknown (already closed)."""
        return self.stream_checks.close_stream(stream_id)

    @property
    def open_streams(self) -> int:
        return self.stream_checks.open_streams

    def stream_length(self, stream_id: int) -> int:
        """Tokens of prompt + text the stream holds (its last check's coverage)."""
        return self.stream_checks.stream_length(stream_id)

    def check_streams(
        self, checks: Sequence[StreamCheck], *, relative: bool = False
    ) -> list[list[float]]:
        """StreamChecks.check: append each check's tokens to its stream, score its labels."""
        return self.stream_checks.check(checks, relative=relative)

    # -------------------------------------------------------------- generation

    def add_request(self, request: GenerationRequest) -> int:
        """Queue a generation; it joins the running batch at the next step with a free slot."""
        return self.generation.add_request(request)

    def cancel(self, request_id: int) -> bool:
        """Drop a request wherever it is; its slot is free for the next step. False if unknown."""
        return self.generation.cancel(request_id)

    @property
    def num_waiting(self) -> int:
        return self.generation.num_waiting

    @property
    def num_running(self) -> int:
        return self.generation.num_running

    def has_unfinished(self) -> bool:
        return self.generation.has_unfinished()

    def step(self) -> list[TokenEvent]:
        """Run one forward pass over the running batch and return one event per sampled token."""
        return self.generation.step()

    def step_with_checks(
        self, checks: Sequence[StreamCheck], *, relative: bool = False
    ) -> tuple[list[TokenEvent], list[list[float]]]:
        """`step()` and `check_streams(checks)` in one forward pass: the decoders' tokens and
        the checks' chains and label trees are packed together, so the weights are read once
        for both (on CPU a check pass alone costs as much as a decode step: both are bound by
        reading the weights). The results equal running the two apart: the checks' slots are
        not the decoders', and each sequence of a pass attends only to its own slot.

        Falls back to two passes where one cannot hold both: nothing to step, checks larger
        than the step's token budget, or a compiled decode step (its graph holds decoders
        only, and on CUDA it is the faster path)."""
        if not checks:
            return self.step(), []
        streams = self.stream_checks
        gen = self.generation
        streams.validate(checks)
        gen.admit()
        streams.prefill_long_prompts(checks)
        check_tokens = sum(streams.size(c) for c in checks)
        if (
            not gen.num_running
            or self.passes.decode_step is not None
            or gen.decoding + check_tokens > self.max_step_tokens
        ):
            return self.step(), self.check_streams(checks, relative=relative)
        with torch.inference_mode():
            slots, chunks, sampled, rows = gen.step_batch(self.max_step_tokens - check_tokens)
            hidden, trees = streams.forward_with_checks(slots, chunks, rows, checks)
            events = gen.step_events(self.model.project(hidden[: len(rows)]), sampled)
            scores = self.scoring.tree_scores(hidden[len(rows) :], trees, relative=relative)
        return events, scores

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_tokens: frozenset[int] | None = None,
    ) -> list[list[int]]:
        """New tokens for each prompt (stop token included when one ended it)."""
        return self.generation.generate(
            prompts,
            max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_tokens=stop_tokens,
        )
