"""The batched engine: owns the cache slots and the step loop.

Generation is continuous batching: requests join and leave between steps, and each step packs
the running sequences' new tokens (one per decoding sequence, a chunk per pre-filling one) into
a single forward pass. Scoring pre-fills prompts in chunks, then scores every continuation of a
prompt in one pass over a token tree (shared label prefixes computed once). A prompt prefix used
by many requests (a policy's instructions) can be pre-filled once and restored into a slot.
"""

from __future__ import annotations

import bisect
import itertools
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from model.attention import AttentionBackend, select_backend
from model.cache import ForwardMetadata, RollingCache
from model.errors import RequestError, SamplingError
from model.graphs import DecodeGraphs, warm_up_prefill
from model.memory import (
    DEFAULT_GPU_MEMORY_UTILIZATION,
    activation_bytes,
    cache_rows,
    device_budget,
    plan_memory,
    weights_bytes,
)
from model.sampling import INVALID, SamplingParams, make_generator, sample_batch
from model.scoring import ContinuationTree
from model.stats import EngineStats
from model.stream_checks import StreamCheck, StreamChecks, _CheckStream
from model.transformer import Transformer, pack_for_cpu

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationRequest:
    prompt: Sequence[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_tokens: frozenset[int] | None = None  # None = the tokenizer's EOS


@dataclass(frozen=True)
class TokenEvent:
    """One step's outcome for one request: a new token, and whether the request is done."""

    request_id: int
    token: int
    finished: bool
    # "stop" (a stop token), "length" (the token budget) or "error" (no token could be
    # sampled for this sequence: `error` says why, `token` is INVALID; the others go on).
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class _Sequence:
    id: int
    request: GenerationRequest
    slot: int
    stop: frozenset[int]
    gen: torch.Generator | None
    fed: int = 0  # prompt tokens already in the cache
    generated: list[int] = field(default_factory=list)

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.request.prompt)


class Engine(StreamChecks):  # StreamChecks builds on Scoring: both are this engine's mixins
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
    `memory` is the resulting MemoryPlan.
    """

    def __init__(
        self,
        model: Transformer,
        *,
        max_batch_size: int = 8,
        score_batch_size: int = 16,
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
        self.backend = (
            select_backend(backend, model.device, model.dtype)
            if isinstance(backend, str)
            else backend
        )
        # Before pack_for_cpu, which adds at most a packed copy of the output projection (1.8%
        # of a 7B).
        weights = weights_bytes(model)
        if model.device.type == "cpu":
            pack_for_cpu(model)
        rows = cache_rows(model.args, max_context)[0]
        # Chunks of at most 4096 tokens (the 7B's window) bound activations for models whose
        # rows are a long context.
        self.chunk_size = chunk_size or min(rows, 4096)
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        # Tokens one forward pass may carry: bounds activation memory when many long prompts
        # arrive together (pre-fill of the rest continues in the next passes).
        self.max_step_tokens = max_step_tokens or max(self.chunk_size, 4096)
        activations = activation_bytes(
            model.args,
            model.dtype,
            step_tokens=self.max_step_tokens,
            chunk_tokens=self.chunk_size,
            rows=rows,
            sequences=max(max_batch_size, score_batch_size),
            logits_rows=max_batch_size + 32 * score_batch_size,
            # On CUDA neither backend holds the scores: flash-attn never does, and SDPA's masked
            # passes are built for the memory-efficient kernel (additive mask, expanded heads).
            materialised_scores=model.device.type != "cuda",
        )
        budget, total, free = device_budget(
            model.device,
            weights=weights,
            activations=activations,
            gpu_memory_utilization=gpu_memory_utilization,
            cache_memory_bytes=cache_memory_bytes,
        )
        # Requested slots are caps: fewer when fewer fit, MemoryBudgetError below two.
        self.memory = plan_memory(
            model.args,
            model.dtype,
            max_context=max_context,
            budget_bytes=budget,
            weights_bytes=weights,
            activation_bytes=activations,
            max_batch_size=max_batch_size,
            score_batch_size=score_batch_size,
            device=str(model.device),
            device_total_bytes=total,
            device_free_bytes=free,
        )
        _log.log(logging.WARNING if self.memory.scaled_down else logging.INFO,
                 self.memory.describe())  # fmt: skip
        max_batch_size = self.memory.generation_slots
        score_batch_size = self.memory.scoring_slots
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
        self.max_batch_size = max_batch_size
        self.score_batch_size = score_batch_size
        # Kept sorted and taken lowest first, so running sequences tend to sit in consecutive
        # slots and the decode path reads the cache as a view.
        self._free_slots = list(range(max_batch_size))
        self._score_slots = list(range(max_batch_size, max_batch_size + score_batch_size))
        self._waiting: deque[_Sequence] = deque()
        self._running: dict[int, _Sequence] = {}
        self._ids = itertools.count()
        self.stats = EngineStats()
        self._trees: dict[tuple[tuple[int, ...], ...], ContinuationTree] = {}
        # Check streams (model/stream_checks.py): a growing text checked as it grows.
        self._stream_checks: dict[int, _CheckStream] = {}
        self._stream_ids = itertools.count()
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
        # Rows of full logits per block when scoring on CPU: ~2 MiB of fp32, cache-sized.
        self._logit_block_rows = max(1, (2 << 20) // (4 * self.args.vocab_size))
        self._decode_step: DecodeGraphs | None = None
        if compile:
            # Padding decoders use the last scoring slot, idle during a decode step.
            self._decode_step = DecodeGraphs(
                model, self.cache, self.backend, max_batch_size=max_batch_size,
                pad_slot=self._score_slots[-1],
            )  # fmt: skip
            self._decode_step.warm_up(self._free_slots)
        # The compiled FlexAttention kernel (CUDA) likewise, before the first caller waits.
        self.prefill_compile_seconds = 0.0
        if model.device.type == "cuda" and getattr(self.backend, "compile_kernel", False):
            self.prefill_compile_seconds = warm_up_prefill(self.score, self.args.vocab_size)

    @property
    def graph_capture_seconds(self) -> float | None:
        """Start-up time spent compiling and capturing the decode graphs; None without."""
        return self._decode_step.capture_seconds if self._decode_step is not None else None

    @property
    def graph_recompiles(self) -> int | None:
        """Decode-step graphs compiled since the start-up warm-up (goal: 0); None without."""
        if self._decode_step is None:
            return None
        return self._decode_step.recompiles_since_warm_up()

    @property
    def graph_batch_sizes(self) -> tuple[int, ...]:
        """Batch sizes decode steps are padded to and run as graphs; () when eager."""
        return tuple(self._decode_step.buckets) if self._decode_step is not None else ()

    # ----------------------------------------------------------------- forward

    def _forward(
        self,
        slots: list[int],
        chunks: list[Sequence[int]],
        *,
        logits_rows: list[int],
        write: list[bool] | None = None,
        trees: list[tuple[list[int], torch.Tensor] | None] | None = None,
        hidden: bool = False,
    ) -> torch.Tensor:
        graphs = self._decode_step
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
        return self._run_planned(meta, hidden=hidden)

    def _run_planned(self, meta: ForwardMetadata, *, hidden: bool = False) -> torch.Tensor:
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

    def _prefill(self, slots: list[int], prompts: list[Sequence[int]]) -> None:
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
            self._forward([b[0] for b in batch], [b[1] for b in batch], logits_rows=[])
            for _, chunk, i in batch:
                offsets[i] += len(chunk)

    def _check_tokens(self, tokens: Sequence[int], what: str) -> None:
        for t in tokens:
            if not 0 <= t < self.args.vocab_size:
                raise RequestError(
                    f"{what}: token id {t} outside the vocabulary (0..{self.args.vocab_size - 1})"
                )

    def _check_length(self, n: int, what: str) -> None:
        if self.max_context is not None and n > self.max_context:
            raise RequestError(f"{what}: {n} tokens exceed the context of {self.max_context}")

    # -------------------------------------------------------------- generation

    def add_request(self, request: GenerationRequest) -> int:
        """Queue a generation; it joins the running batch at the next step with a free slot."""
        if not request.prompt:
            raise RequestError("prompt is empty")
        if request.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        self._check_tokens(request.prompt, "prompt")
        self._check_length(len(request.prompt) + request.max_new_tokens, "prompt + max_new_tokens")
        seq = _Sequence(
            id=next(self._ids),
            request=request,
            slot=-1,
            stop=request.stop_tokens
            if request.stop_tokens is not None
            else frozenset({self.eos_id}),
            gen=make_generator(request.sampling, self.model.device),
        )
        self._waiting.append(seq)
        return seq.id

    def cancel(self, request_id: int) -> bool:
        """Drop a request wherever it is; its slot is free for the next step. False if unknown."""
        for seq in self._waiting:
            if seq.id == request_id:
                self._waiting.remove(seq)
                return True
        seq_or_none = self._running.pop(request_id, None)
        if seq_or_none is None:
            return False
        self._release(seq_or_none)
        return True

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    def _release(self, seq: _Sequence) -> None:
        self.cache.reset(seq.slot)
        bisect.insort(self._free_slots, seq.slot)

    def step(self) -> list[TokenEvent]:
        """Run one forward pass over the running batch and return one event per sampled token."""
        self._admit()
        if not self._running:
            return []
        slots, chunks, sampled, rows = self._step_batch(self.max_step_tokens)
        logits = self._forward(slots, chunks, logits_rows=rows)
        return self._step_events(logits, sampled)

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
        self._validate_checks(checks)
        self._admit()
        self._prefill_long_prompts(checks)
        check_tokens = sum(self._check_size(c) for c in checks)
        decoders = sum(1 for q in self._running.values() if not q.prefilling)
        if (
            not self._running
            or self._decode_step is not None
            or decoders + check_tokens > self.max_step_tokens
        ):
            return self.step(), self.check_streams(checks, relative=relative)
        with torch.inference_mode():
            slots, chunks, sampled, rows = self._step_batch(self.max_step_tokens - check_tokens)
            hidden, trees = self._forward_with_checks(slots, chunks, rows, checks)
            events = self._step_events(self.model.project(hidden[: len(rows)]), sampled)
            scores = self._tree_scores(hidden[len(rows) :], trees, relative=relative)
        return events, scores

    def _admit(self) -> None:
        while self._waiting and self._free_slots:
            seq = self._waiting.popleft()
            seq.slot = self._free_slots.pop(0)
            self.cache.reset(seq.slot)
            self._running[seq.id] = seq

    def _step_batch(
        self, max_tokens: int
    ) -> tuple[list[int], list[Sequence[int]], list[_Sequence], list[int]]:
        """The running batch's slots and new tokens for one pass of at most `max_tokens`
        (decoders always advance), which sequences sample a token, and their packed rows."""
        slots: list[int] = []
        chunks: list[Sequence[int]] = []
        sampled: list[_Sequence] = []
        rows: list[int] = []
        n_tokens = 0
        # Decoding sequences always advance and are packed first, in slot order (the plan's
        # decode path; consecutive slots read the cache as a view); pre-fill chunks share what
        # is left of the budget (at least one chunk per step, so a long prompt never starves).
        running = sorted(self._running.values(), key=lambda q: (q.prefilling, q.slot))
        budget = max_tokens - sum(1 for q in running if not q.prefilling)
        prefill_started = False
        for seq in running:
            if seq.prefilling:
                if budget <= 0 and prefill_started:
                    continue
                size = min(self.chunk_size, max(budget, 1))
                chunk = seq.request.prompt[seq.fed : seq.fed + size]
                seq.fed += len(chunk)
                budget -= len(chunk)
                prefill_started = True
            else:
                chunk = [seq.generated[-1]]
            slots.append(seq.slot)
            chunks.append(chunk)
            n_tokens += len(chunk)
            if not seq.prefilling:
                # The last prompt chunk and every decode token yield the next token.
                sampled.append(seq)
                rows.append(n_tokens - 1)
        return slots, chunks, sampled, rows

    def _step_events(self, logits: torch.Tensor, sampled: list[_Sequence]) -> list[TokenEvent]:
        new_tokens, errors = self._sample(logits, sampled)
        events: list[TokenEvent] = []
        for seq, token, error in zip(sampled, new_tokens, errors, strict=True):
            reason = None
            if error is not None:
                reason = "error"
            else:
                seq.generated.append(token)
                if token in seq.stop:
                    reason = "stop"
                elif len(seq.generated) >= seq.request.max_new_tokens:
                    reason = "length"
            if reason is not None:
                del self._running[seq.id]
                self._release(seq)
            events.append(TokenEvent(seq.id, token, reason is not None, reason, error))
        return events

    def _sample(
        self, logits: torch.Tensor, seqs: list[_Sequence]
    ) -> tuple[list[int], list[str | None]]:
        """Each sequence's next token, or why it has none: one sequence's failure ends that
        sequence only. One batched sampling call and one read of its tokens (the step's only
        sync); when the batched call raises, each row is sampled alone to find which fail."""
        params = [q.request.sampling for q in seqs]
        gens = [q.gen for q in seqs]
        try:
            tokens = sample_batch(logits, params, gens).tolist()
        except Exception:
            _log.exception("sampling a batch of %d failed; sampling each row alone", len(seqs))
            tokens = []
            failed: dict[int, str] = {}
            for i in range(len(seqs)):
                try:
                    tokens.append(int(sample_batch(logits[i : i + 1], params[i:i + 1],
                                                   gens[i:i + 1])[0]))  # fmt: skip
                except Exception as exc:
                    tokens.append(INVALID)
                    failed[i] = f"sampling failed: {type(exc).__name__}: {str(exc)[:200]}"
            return tokens, [failed.get(i) for i in range(len(seqs))]
        errors: list[str | None] = [None] * len(seqs)
        for i, token in enumerate(tokens):
            if token == INVALID:
                errors[i] = (
                    "sampling failed: the model's logits for this sequence are not finite "
                    "(NaN or infinity), or its temperature scales them out of range"
                )
        if any(errors):
            _log.warning("sampling failed for %d of %d sequences: non-finite logits",
                         sum(e is not None for e in errors), len(seqs))  # fmt: skip
        return tokens, errors

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
        params = SamplingParams(temperature=temperature, top_p=top_p, seed=seed)
        ids = [
            self.add_request(GenerationRequest(p, max_new_tokens, params, stop_tokens))
            for p in prompts
        ]
        out: dict[int, list[int]] = {i: [] for i in ids}
        errors: list[str] = []
        while self.has_unfinished():
            for ev in self.step():
                if ev.error is not None:
                    errors.append(ev.error)
                else:
                    out[ev.request_id].append(ev.token)
        if errors:  # the others ran to their end; a list of lists has no place for an error
            raise SamplingError(f"{len(errors)} of {len(ids)} sequences failed: {errors[0]}")
        return [out[i] for i in ids]
