"""Generation: continuous batching over the engine's generation slots.

Requests join and leave between steps, and each step packs the running sequences' new tokens
(one per decoding sequence, a chunk per pre-filling one) into a single forward pass
(model/passes.py). The generation slots are shared with stream checks (a `SlotPool`).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from model.errors import RequestError, SamplingError
from model.passes import Passes, SlotPool
from model.sampling import INVALID, SamplingParams, make_generator, sample_batch

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
class RunningSequence:
    """A generation request while it is queued or running: its slot, progress and tokens."""

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


class Generation:
    """Generation requests over the engine's generation slots (see the module docstring)."""

    def __init__(self, passes: Passes, free_slots: SlotPool, *, eos_id: int):
        self.passes = passes
        self.cache = passes.cache
        self.free_slots = free_slots
        self.eos_id = eos_id
        self._waiting: deque[RunningSequence] = deque()
        self._running: dict[int, RunningSequence] = {}
        self._ids = itertools.count()

    @property
    def decoding(self) -> int:
        """Running sequences past their prompt (one token each in a step)."""
        return sum(1 for q in self._running.values() if not q.prefilling)

    def add_request(self, request: GenerationRequest) -> int:
        """Queue a generation; it joins the running batch at the next step with a free slot."""
        if not request.prompt:
            raise RequestError("prompt is empty")
        if request.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        self.passes.check_tokens(request.prompt, "prompt")
        self.passes.check_length(
            len(request.prompt) + request.max_new_tokens, "prompt + max_new_tokens"
        )
        seq = RunningSequence(
            id=next(self._ids),
            request=request,
            slot=-1,
            stop=request.stop_tokens
            if request.stop_tokens is not None
            else frozenset({self.eos_id}),
            gen=make_generator(request.sampling, self.passes.model.device),
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

    def _release(self, seq: RunningSequence) -> None:
        self.cache.reset(seq.slot)
        self.free_slots.give(seq.slot)

    def step(self) -> list[TokenEvent]:
        """Run one forward pass over the running batch and return one event per sampled token."""
        self.admit()
        if not self._running:
            return []
        slots, chunks, sampled, rows = self.step_batch(self.passes.max_step_tokens)
        logits = self.passes.forward(slots, chunks, logits_rows=rows)
        return self.step_events(logits, sampled)

    def admit(self) -> None:
        while self._waiting and self.free_slots:
            seq = self._waiting.popleft()
            slot = self.free_slots.take()
            assert slot is not None
            seq.slot = slot
            self.cache.reset(seq.slot)
            self._running[seq.id] = seq

    def step_batch(
        self, max_tokens: int
    ) -> tuple[list[int], list[Sequence[int]], list[RunningSequence], list[int]]:
        """The running batch's slots and new tokens for one pass of at most `max_tokens`
        (decoders always advance), which sequences sample a token, and their packed rows."""
        slots: list[int] = []
        chunks: list[Sequence[int]] = []
        sampled: list[RunningSequence] = []
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
                size = min(self.passes.chunk_size, max(budget, 1))
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

    def step_events(self, logits: torch.Tensor, sampled: list[RunningSequence]) -> list[TokenEvent]:
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
        self, logits: torch.Tensor, seqs: list[RunningSequence]
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
