"""Stream checks: label scores of a growing text, each check at the cost of its new tokens.

A check stream holds a prompt that ends with a growing text (a classifier prompt whose answer
is being generated) in a cache slot of its own. Each check appends the text's new tokens to
the slot and scores every continuation after a closer (e.g. `[/INST]`), all in one pass: the
new tokens, the closer and the continuations' token tree form one read-only token tree whose
first tokens are a chain (so they attend exactly as a pre-filled chunk would, window band
included), and only the new tokens' keys and values are written to the slot. The closer and
the continuations never touch the cache, so the slot holds exactly the prompt and text so far,
and a check costs the new tokens plus the closer and the labels, never the text so far. Past
the window the rolling buffer drops the oldest positions, so memory stays fixed for any
length. Checks of many streams share one pass, and that pass can be a generation step's
(`Engine.step_with_checks`): the decoders' tokens and the checks' trees packed together read
the weights once, which is most of what a small pass costs.

A check equals scoring prompt + text + closer from scratch (`Engine.score_batch`): the same
positions, the same keys in each token's window.

Check streams take their slots from the generation slots (a stream being checked is also being
generated, so both hold one slot for as long as it runs).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from model import transfer
from model.cache import ForwardMetadata
from model.errors import RequestError
from model.passes import Passes, SlotPool
from model.scoring import ContinuationTree, Prefix, Scoring


@dataclass(frozen=True)
class StreamCheck:
    """One check: append `tokens` to stream `stream_id`, then score each continuation after
    the stream so far + `closer`."""

    stream_id: int
    tokens: Sequence[int]
    closer: Sequence[int]
    continuations: Sequence[Sequence[int]]


@dataclass
class _CheckStream:
    slot: int
    pending: list[int] = field(default_factory=list)  # prompt tokens not yet in the slot
    length: int = 0  # tokens of prompt + text in the slot (or pending)


class StreamChecks:
    """Check streams over generation slots (see the module docstring): a check's label tree is
    scored by the engine's `Scoring`, its pass run by the engine's `Passes`."""

    def __init__(self, passes: Passes, scoring: Scoring, free_slots: SlotPool):
        self.passes = passes
        self.scoring = scoring
        self.cache = passes.cache
        self.stats = passes.stats
        self.free_slots = free_slots
        self._streams: dict[int, _CheckStream] = {}
        self._ids = itertools.count()

    def open_stream(self, prompt: Sequence[int], prefix: Prefix | None = None) -> int | None:
        """Start a check stream on prefix.tokens + prompt; None when no slot is free now.

        The prefix's cached window is restored into the slot; the prompt is fed with the first
        check (or before it, when too long to share its pass).
        """
        self.passes.check_tokens(prompt, "stream prompt")
        slot = self.free_slots.take()
        if slot is None:
            return None
        self.cache.reset(slot)
        if prefix is not None:
            self.cache.restore_many([slot], prefix.snapshot)
            self.stats.prefix_tokens_reused += len(prefix.tokens)
        stream_id = next(self._ids)
        self._streams[stream_id] = _CheckStream(
            slot, list(prompt), self.cache.lengths[slot] + len(prompt)
        )
        return stream_id

    def close_stream(self, stream_id: int) -> bool:
        """Free a check stream's slot; False if unknown (already closed)."""
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return False
        self.cache.reset(stream.slot)
        self.free_slots.give(stream.slot)
        return True

    @property
    def open_streams(self) -> int:
        """Check streams open now."""
        return len(self._streams)

    def stream_length(self, stream_id: int) -> int:
        """Tokens of prompt + text the stream holds (its last check's coverage)."""
        return self._streams[stream_id].length

    def check(self, checks: Sequence[StreamCheck], *, relative: bool = False) -> list[list[float]]:
        """Append each check's tokens to its stream and score its continuations after the
        closer: one pass for as many checks as `max_step_tokens` allows (see score_batch for
        `relative`). `Engine.step_with_checks` runs them in a generation step's pass."""
        self.validate(checks)
        self.prefill_long_prompts(checks)
        results: list[list[float]] = []
        group: list[StreamCheck] = []
        size = 0
        for c in checks:
            n = self.size(c)
            if group and size + n > self.passes.max_step_tokens:
                results.extend(self._check_group(group, relative=relative))
                group, size = [], 0
            group.append(c)
            size += n
        if group:
            results.extend(self._check_group(group, relative=relative))
        return results

    def validate(self, checks: Sequence[StreamCheck]) -> None:
        seen: set[int] = set()
        for i, c in enumerate(checks):
            if c.stream_id not in self._streams:
                raise RequestError(f"check {i}: unknown stream {c.stream_id}")
            if c.stream_id in seen:
                raise RequestError(f"check {i}: stream {c.stream_id} is checked twice")
            seen.add(c.stream_id)
            if not c.closer:
                raise RequestError(f"check {i}: the closer is empty")
            if not c.continuations or any(len(x) == 0 for x in c.continuations):
                raise RequestError(f"check {i}: continuations must be non-empty token lists")
            self.passes.check_tokens(c.tokens, f"check {i} tokens")
            self.passes.check_tokens(c.closer, f"check {i} closer")
            for x in c.continuations:
                self.passes.check_tokens(x, f"check {i} continuation")
            n = self._streams[c.stream_id].length + len(c.tokens) + len(c.closer)
            self.passes.check_length(n + max(len(x) for x in c.continuations) - 1, f"check {i}")

    def prefill_long_prompts(self, checks: Sequence[StreamCheck]) -> None:
        """A prompt too long to share a check's pass is pre-filled first, in chunks."""
        long = [
            s
            for s in (self._streams[c.stream_id] for c in checks)
            if len(s.pending) > self.passes.chunk_size
        ]
        if long:
            self.passes.prefill([s.slot for s in long], [s.pending for s in long])
            for s in long:
                s.pending = []

    def size(self, c: StreamCheck) -> int:
        """Tokens a check adds to a pass: its chain, then its label tree less the root."""
        return self._chain_tokens(c) + len(self.scoring.tree(c.continuations).tokens) - 1

    def _chain_tokens(self, c: StreamCheck) -> int:
        return len(self._streams[c.stream_id].pending) + len(c.tokens) + len(c.closer)

    @torch.inference_mode()
    def _check_group(self, checks: Sequence[StreamCheck], *, relative: bool) -> list[list[float]]:
        hidden, trees = self.forward_with_checks([], [], [], checks)
        return self.scoring.tree_scores(hidden, trees, relative=relative)

    def forward_with_checks(
        self,
        slots: list[int],
        chunks: list[Sequence[int]],
        rows: list[int],
        checks: Sequence[StreamCheck],
    ) -> tuple[torch.Tensor, list[ContinuationTree]]:
        """One pass of the written sequences `chunks` (a generation step's decoders and
        pre-fill chunks, their hidden states wanted at packed `rows`) and the checks' read-only
        token trees: the hidden states of `rows`, then of every check's tree nodes, in order.

        Each check's chain (pending prompt, new tokens, closer) and label tree form one token
        tree; only the first `written` tokens of it (prompt and new tokens) are written to its
        slot, as a pre-filled chunk's would be. Attention reads each pre-fill sequence's cached
        window before this pass's keys are written (model.attention), so the trees see the
        slot as it was plus their own tokens; the decoders write first and read their own
        slots only, which no check touches."""
        streams = [self._streams[c.stream_id] for c in checks]
        check_slots = [s.slot for s in streams]
        check_chunks: list[list[int]] = []
        tree_specs: list[tuple[list[int], torch.Tensor] | None] = []
        trees: list[ContinuationTree] = []
        written: list[int] = []  # leading tokens of each chain that stay in the slot
        check_rows: list[int] = []  # packed rows whose hidden states score the labels
        offset = sum(len(c) for c in chunks)  # the checks are packed after the step's tokens
        for c, s in zip(checks, streams, strict=True):
            tree = self.scoring.tree(c.continuations)
            chain = [*s.pending, *c.tokens, *c.closer]
            chunk = chain + tree.tokens[1:]
            depths = list(range(len(chain))) + [len(chain) - 1 + d for d in tree.depths[1:]]
            tree_specs.append((depths, _chain_tree_mask(len(chain), tree)))
            check_chunks.append(chunk)
            trees.append(tree)
            written.append(len(s.pending) + len(c.tokens))
            # The tree's node j is packed row len(chain) - 1 + j (node 0 is the closer's last).
            check_rows.extend(offset + len(chain) - 1 + j for j in range(len(tree.tokens)))
            offset += len(chunk)
        cache = self.cache
        lengths = [cache.lengths[s] for s in check_slots]
        all_chunks = [*chunks, *check_chunks]
        no_trees: list[tuple[list[int], torch.Tensor] | None] = [None] * len(slots)
        meta = cache.plan(
            [*slots, *check_slots],
            [len(c) for c in all_chunks],
            tokens=list(itertools.chain.from_iterable(all_chunks)),
            logits_rows=[*rows, *check_rows],
            write=[True] * len(slots) + [False] * len(checks),
            trees=no_trees + tree_specs,
        )
        # Check sequences are never decoders (they are trees), so the plan keeps them last, in
        # order, after the step's tokens.
        _add_writes(
            meta,
            check_slots,
            lengths,
            [len(c) for c in check_chunks],
            written,
            cache.window,
            start=sum(len(c) for c in chunks),
        )
        for slot, n in zip(check_slots, written, strict=True):
            cache.lengths[slot] += n
        for c, s in zip(checks, streams, strict=True):
            s.pending = []
            s.length += len(c.tokens)
        return self.passes.run_planned(meta, hidden=True), trees


def _add_writes(
    meta: ForwardMetadata,
    slots: list[int],
    lengths: list[int],
    seqlens: list[int],
    written: list[int],
    window: int,
    *,
    start: int = 0,
) -> None:
    """Make a planned pass also write the first `written[b]` tokens of each of its read-only
    sequences packed from row `start` on: the last `window` of them survive, as in a pre-fill
    chunk. The pass's own writes (a step's decoders and chunks) come first."""
    src: list[int] = []
    dst: list[int] = []
    for slot, n, seqlen, k in zip(slots, lengths, seqlens, written, strict=True):
        first = max(0, k - window)
        for j in range(first, k):
            src.append(start + j)
            dst.append(slot * window + (n + j) % window)
        start += seqlen
    if not dst:
        return
    device = meta.positions.device
    both = transfer.upload(torch.tensor(dst + src, dtype=torch.long), device)
    rows, srcs = both[: len(dst)], both[len(dst) :]
    if meta.write_rows.numel():
        # write_src of a pass with written sequences is never None: a plan leaves it None
        # only for a pass of decoders alone, and this pass holds checks.
        assert meta.write_src is not None
        rows = torch.cat([meta.write_rows, rows])
        srcs = torch.cat([meta.write_src, srcs])
    meta.write_rows, meta.write_src = rows, srcs


def _chain_tree_mask(chain: int, tree: ContinuationTree) -> torch.Tensor:
    """Ancestor mask of `chain` tokens in a row (each sees those before it) followed by the
    tree's nodes 1.. (each sees the whole chain, whose last token is the tree's root, and its
    own ancestors)."""
    n = chain + len(tree.tokens) - 1
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:chain, :chain] = torch.ones(chain, chain, dtype=torch.bool).tril()
    mask[chain:, :chain] = True
    mask[chain:, chain:] = tree.ancestors[1:, 1:]
    return mask
