"""Rolling buffer KV cache and the per-forward indexing computed from it.

Each cache slot holds one sequence's keys and values for the last W positions, per layer;
position i lives at row i mod W and overwrites the oldest (paper, section 2). Memory is fixed by
W and the number of slots, never by sequence length.

Every forward pass is planned once here (`RollingCache.plan`): positions, which cached rows each
sequence reads in position order, where new keys go. Attention layers only read the plan.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from typing import Any

import torch

from model import transfer
from model.args import ModelArgs
from model.errors import RequestError
from model.memory import cache_rows


@dataclass
class DecodePlan:
    """The sequences of a pass that add one token and write it (packed rows 0..count-1): each
    writes its key first, then attends straight on its slot's buffer, which then holds exactly
    its window. Before a slot wraps its rows 0..length-1 are its positions 0..length-1, so
    attention reads only the first `span` rows of each slot, not the whole window."""

    count: int
    slots: torch.Tensor  # [count] int32 cache slot of each sequence
    lengths: torch.Tensor  # [count] int32 rows each slot holds after the write
    span: int  # rows read per slot: the longest length, rounded up to a bucket when bucketed
    # [count, 1, 1, span] when some slot holds fewer rows than span (rows past a slot's length
    # are stale or padding): bool on CPU, additive in the cache dtype on CUDA (what the
    # efficient SDPA kernel takes, converted once per pass instead of once per layer).
    mask: torch.Tensor | None
    # When the sequences sit in consecutive slots, in order (the buffers are then read as a
    # view instead of copied): every layer's keys and values as views [layers, count,
    # kv_heads, span, head_dim] of the buffers, made once per pass (not ten views per layer).
    views: tuple[torch.Tensor, torch.Tensor] | None = None
    n_slots: int = 0  # slots of the cache (what a decode over every slot's rows is shaped by)


@dataclass
class ForwardMetadata:
    """Indexing for one forward pass over packed sequences; built before the forward (by the
    cache's plan and the attention backend's `prepare`), only read by the layers.

    Decoding sequences come first (`decoding`), then the pre-fill sequences: chunks, token
    trees, or fresh sequences. The per-sequence fields describe the pre-fill sequences only,
    their offsets relative to the first pre-fill row.
    """

    window: int
    positions: torch.Tensor  # [T] absolute position of each packed token
    seqlens: list[int]  # new tokens per pre-fill sequence, packed in this order
    cached_lens: list[int]  # cached keys each reads (its window before this pass)
    start_positions: list[int]  # position of each one's first new token
    cu_seqlens_q: torch.Tensor  # [B+1] int32 offsets of new tokens
    cu_seqlens_k: torch.Tensor  # [B+1] int32 offsets of keys (cached + new)
    gather_rows: torch.Tensor  # [sum cached_lens] cache rows to read, in position order
    key_order: torch.Tensor | None  # index into cat([gathered, new]) giving per-sequence keys
    write_rows: torch.Tensor  # cache rows written by this pass (decoders' first)
    write_src: torch.Tensor | None  # packed row of each written row; None: rows 0..n-1
    trees: list[torch.Tensor | None]  # per sequence: ancestor mask [L, L] of a token tree
    decoding: DecodePlan | None = None
    tokens: torch.Tensor | None = None  # [T] packed tokens, when the plan was given them
    logits_index: torch.Tensor | None = None  # packed rows whose logits are wanted; None: all
    # [3, B] seqlens, cached_lens, start_positions; [T - decoders] sequence of each token.
    lens: torch.Tensor | None = None
    token_seq: torch.Tensor | None = None
    # Set by the attention backend's prepare(): each pre-fill sequence's mask (None = plain
    # causal), or the pass as one padded batch (model.attention.PaddedLayout).
    masks: list[torch.Tensor | None] | None = None
    padded: Any = None
    # Set by the flex backend's prepare(): the pass's block masks (model.flex.FlexPass for its
    # pre-fill sequences, model.flex.FlexDecode for its decoders when flex decodes).
    flex: Any = None
    flex_decode: Any = None
    prepared: bool = False

    @property
    def n_decode(self) -> int:
        return self.decoding.count if self.decoding is not None else 0

    # Lists with a 0 rather than max(..., default=0), which dynamo cannot trace (a compiled
    # step through the flash-attn ops reads these).
    @property
    def max_seqlen_q(self) -> int:
        return max([0, *self.seqlens])

    @property
    def max_seqlen_k(self) -> int:
        return max([0] + [c + s for c, s in zip(self.cached_lens, self.seqlens, strict=True)])

    @classmethod
    def fresh(cls, seqlens: list[int], window: int, device: torch.device) -> ForwardMetadata:
        """Plan for sequences starting at position 0 with no cache (a plain full forward)."""
        positions = torch.cat([torch.arange(n) for n in seqlens])
        token_seq = torch.repeat_interleave(torch.arange(len(seqlens)), torch.tensor(seqlens))
        zeros = [0] * len(seqlens)
        lens = torch.tensor([seqlens, zeros, zeros])
        cu = torch.tensor(list(itertools.accumulate(seqlens, initial=0)))
        parts = [positions, cu, lens, token_seq]
        positions, cu, lens, token_seq = transfer.upload_ints(parts, device)
        cu = cu.int()
        empty = positions[:0]
        return cls(
            window=window,
            positions=positions,
            seqlens=list(seqlens),
            cached_lens=zeros,
            start_positions=zeros,
            cu_seqlens_q=cu,
            cu_seqlens_k=cu,
            gather_rows=empty,
            key_order=None,
            write_rows=empty,
            write_src=None,
            trees=[None] * len(seqlens),
            lens=lens,
            token_seq=token_seq,
        )


def decode_span(longest: int, window: int, bucketed: bool) -> int:
    """Rows a decode step reads per slot. Bucketed (CUDA, compiled steps): the next power of two
    from 64, so that the shapes a step can take stay few (7 for a 4096 window)."""
    if not bucketed:
        return longest
    return min(window, max(64, 1 << (longest - 1).bit_length()))


def _ranges(starts: list[int], lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence index, value) of the concatenated ranges starts[b] .. starts[b]+lengths[b]-1,
    built on the host with a fixed number of tensor operations whatever the number of ranges."""
    n = torch.tensor(lengths, dtype=torch.long)
    seq = torch.repeat_interleave(torch.arange(len(lengths)), n, output_size=sum(lengths))
    first = torch.tensor(starts, dtype=torch.long)
    begin = torch.cumsum(n, 0) - n  # where each range starts in the concatenation
    return seq, first[seq] + torch.arange(sum(lengths)) - begin[seq]


def _reorder(
    order: list[int], seqlens: list[int], tokens: list[int] | None, rows: list[int] | None
) -> tuple[list[int] | None, list[int] | None]:
    """Packed tokens and logit rows after the sequences are put in `order`."""
    cu = list(itertools.accumulate(seqlens, initial=0))
    new_start = [0] * len(seqlens)
    offset = 0
    for b in order:
        new_start[b] = offset
        offset += seqlens[b]
    if tokens is not None:
        tokens = [t for b in order for t in tokens[cu[b] : cu[b + 1]]]
    if rows is not None:
        rows = [new_start[b] + r - cu[b] for r in rows for b in (bisect.bisect_right(cu, r) - 1,)]
    return tokens, rows


class RollingCache:
    """Keys and values of `n_slots` sequences, `window` positions each, for every layer."""

    def __init__(
        self,
        *,
        n_layers: int,
        n_slots: int,
        window: int,
        n_kv_heads: int,
        head_dim: int,
        sliding: bool,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.n_slots = n_slots
        self.window = window
        # Without a sliding window the buffer is the whole context: wrapping would silently
        # drop positions the model should still see, so planning past it is an error.
        self.sliding = sliding
        self.device = torch.device(device)
        # Rows are slot * window + position % window: flat so that one index_select or
        # index_copy_ serves every sequence of a pass.
        shape = (n_layers, n_slots * window, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=self.device, dtype=dtype)
        self.v = torch.zeros(shape, device=self.device, dtype=dtype)
        self.lengths = [0] * n_slots
        # Round decode attention spans up to a few bucket sizes (see decode_span): on for CUDA
        # and compiled steps, whose shapes should stay few; off on CPU, where the exact span
        # computes least.
        self.bucket_spans = self.device.type == "cuda"
        # Compiled steps: no shape or value that changes between steps of a bucket (the decode
        # path then reads slots by index, never as a view whose bounds are Python ints).
        self.static_steps = False
        # Writes index the whole buffer, (layer, row): an in-place index_put_ on a graph input,
        # which a compiled step keeps in place (a write through a per-layer view of the buffer
        # is functionalised into a copy of the whole buffer).
        self._layer_ids = torch.arange(n_layers, device=self.device)

    @classmethod
    def for_model(
        cls,
        args: ModelArgs,
        n_slots: int,
        *,
        max_context: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> RollingCache:
        """A cache whose rows per slot are the model's sliding window, or the context limit
        without one (the model's max_seq_len when None); see memory.cache_rows."""
        window, sliding, _ = cache_rows(args, max_context)
        return cls(
            n_layers=args.n_layers,
            n_slots=n_slots,
            window=window,
            n_kv_heads=args.n_kv_heads,
            head_dim=args.head_dim,
            sliding=sliding,
            device=device,
            dtype=dtype,
        )

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def reset(self, slot: int) -> None:
        """Forget a slot's sequence; its rows are overwritten as the next one fills them."""
        self.lengths[slot] = 0

    def snapshot(self, slot: int) -> CacheSnapshot:
        """Copy out the rows of a slot's window, in position order (for prefix reuse)."""
        n = self.lengths[slot]
        first = max(0, n - self.window)
        rows = self._rows(slot, first, n)
        return CacheSnapshot(length=n, k=self.k[:, rows].clone(), v=self.v[:, rows].clone())

    def restore_many(self, slots: list[int], snap: CacheSnapshot) -> None:
        """Put a snapshot into slots, as if its tokens had just been pre-filled there (one
        copy for all the slots)."""
        first = max(0, snap.length - self.window)
        base = torch.arange(first, snap.length, device=self.device) % self.window
        slot_t = torch.tensor(slots, device=self.device)
        # [layers, slots, rows, ...] indexed by (slot, row) pairs; the snapshot broadcasts over
        # the slots instead of being repeated (a long prefix times 32 slots is a lot of memory).
        shape = (self.k.shape[0], self.n_slots, self.window, *self.k.shape[2:])
        for buf, values in ((self.k, snap.k), (self.v, snap.v)):
            buf.view(shape)[:, slot_t[:, None], base[None, :]] = values[:, None]
        for slot in slots:
            self.lengths[slot] = snap.length

    def _rows(self, slot: int, first: int, end: int) -> torch.Tensor:
        pos = torch.arange(first, end, device=self.device)
        return slot * self.window + pos % self.window

    def plan(
        self,
        slots: list[int],
        seqlens: list[int],
        *,
        tokens: list[int] | None = None,
        logits_rows: list[int] | None = None,
        write: list[bool] | None = None,
        trees: list[tuple[list[int], torch.Tensor] | None] | None = None,
        pad: tuple[int, int] | None = None,
    ) -> ForwardMetadata:
        """Plan a pass adding `seqlens[b]` tokens to the sequence in `slots[b]`.

        `tokens` (packed in the order given) and `logits_rows` (packed rows whose logits are
        wanted) travel with the plan's indices: every integer of the pass reaches the device in
        one non-blocking copy. Sequences that add one token and write it are packed first (the
        decode path); `meta.tokens` and `meta.logits_index` follow that order.

        A sequence with write=False reads its slot but leaves it unchanged. A tree sequence
        (`trees[b] = (depths, ancestor_mask)`) is a token tree hanging off the cached prompt:
        token j sits at position length + depths[j] and sees only its ancestors and itself,
        which scores many continuations of one prompt in one pass. Trees never write.
        Written slots advance their length.

        `pad = (rows, slot)`, for a pass of decoders only (model/graphs.py): `rows` padding
        decoders after them, which write rows 0.. of `slot` (an idle one) and read one row of
        it, so that the step has its bucket's batch size. The slot's length is left alone.
        """
        n_seq = len(slots)
        trees = trees if trees is not None else [None] * n_seq
        write = write if write is not None else [True] * n_seq
        written = [s for s, w in zip(slots, write, strict=True) if w]
        if len(set(written)) != len(written):
            raise ValueError("a slot can be written by only one sequence per pass")
        W = self.window
        for s, n_new in zip(slots, seqlens, strict=True):
            if not self.sliding and self.lengths[s] + n_new > W:
                raise RequestError(
                    f"sequence of {self.lengths[s] + n_new} tokens exceeds the context of {W}"
                )
        for tree, w, n_new in zip(trees, write, seqlens, strict=True):
            if tree is not None and (w or len(tree[0]) != n_new):
                raise ValueError("a token tree is read-only and needs one depth per token")
        decoding = [
            w and n == 1 and t is None for n, w, t in zip(seqlens, write, trees, strict=True)
        ]
        order = [b for b in range(n_seq) if decoding[b]] + [
            b for b in range(n_seq) if not decoding[b]
        ]
        if order != list(range(n_seq)):
            tokens, logits_rows = _reorder(order, seqlens, tokens, logits_rows)
            slots, seqlens = [slots[b] for b in order], [seqlens[b] for b in order]
            write, trees = [write[b] for b in order], [trees[b] for b in order]
        nd = sum(decoding)
        if nd == n_seq:
            return self._plan_decode(slots, tokens, logits_rows, pad)
        if pad is not None:
            raise ValueError("only a pass of decoders is padded")
        return self._plan_mixed(nd, slots, seqlens, tokens, logits_rows, write, trees)

    def _decode_host(self, slots: list[int]) -> tuple[list[int], list[int], list[int], int]:
        """Positions, written rows and lengths of decoding slots; advances their lengths."""
        W = self.window
        starts = [self.lengths[s] for s in slots]
        rows = [s * W + p % W for s, p in zip(slots, starts, strict=True)]
        lengths = [min(p + 1, W) for p in starts]
        for s in slots:
            self.lengths[s] += 1
        return starts, rows, lengths, max(lengths)

    def _decode_plan(
        self, slots: list[int], slots_t: torch.Tensor, lengths_t: torch.Tensor, longest: int,
        shortest: int,
    ) -> DecodePlan:  # fmt: skip
        span = decode_span(longest, self.window, self.bucket_spans)
        mask = None
        # Built once per pass rather than in every layer; always in compiled steps, so that a
        # step's graph does not depend on whether its slots are equally long.
        if shortest < span or self.static_steps:
            keep = torch.arange(span, device=self.device)[None, :] < lengths_t[:, None]
            if self.device.type == "cuda":
                zero = torch.zeros((), dtype=self.k.dtype, device=self.device)
                mask = zero.masked_fill(~keep, float("-inf"))
            else:
                mask = keep
            mask = mask[:, None, None, :]
        n = len(slots)
        consecutive = not self.static_steps and slots == list(range(slots[0], slots[0] + n))
        views = None
        if consecutive:
            first = slots[0]
            shape = (self.k.shape[0], self.n_slots, self.window, *self.k.shape[2:])
            views = (
                self.k.view(shape)[:, first : first + n, :span].transpose(2, 3),
                self.v.view(shape)[:, first : first + n, :span].transpose(2, 3),
            )
        return DecodePlan(
            count=n,
            slots=slots_t.int(),
            lengths=lengths_t.int(),
            span=span,
            mask=mask,
            views=views,
            n_slots=self.n_slots,
        )

    def _plan_decode(
        self,
        slots: list[int],
        tokens: list[int] | None,
        logits_rows: list[int] | None,
        pad: tuple[int, int] | None = None,
    ) -> ForwardMetadata:
        """The common step: one new token per sequence. Built from plain lists, because this
        runs once per generated token, and copied to the device in one transfer."""
        starts, rows, lengths, longest = self._decode_host(slots)
        if pad is not None and pad[0] > 0:
            count, slot = pad
            starts = starts + [0] * count
            rows = rows + [slot * self.window + j % self.window for j in range(count)]
            slots = slots + [slot] * count
            lengths = lengths + [1] * count
            tokens = tokens + [0] * count if tokens is not None else None
        n = len(slots)
        rows_wanted = logits_rows is not None and logits_rows != list(range(n))
        host = starts + rows + slots + lengths + (tokens or []) + (
            logits_rows if rows_wanted and logits_rows is not None else []
        )  # fmt: skip
        flat = transfer.upload(torch.tensor(host, dtype=torch.long), self.device)
        positions, write_rows, slots_t, lengths_t = (flat[i * n : (i + 1) * n] for i in range(4))
        tokens_t = flat[4 * n : 5 * n] if tokens is not None else None
        index = flat[4 * n + (n if tokens is not None else 0) :] if rows_wanted else None
        empty = positions[:0]
        return ForwardMetadata(
            window=self.window,
            positions=positions,
            seqlens=[],
            cached_lens=[],
            start_positions=[],
            cu_seqlens_q=empty.int(),
            cu_seqlens_k=empty.int(),
            gather_rows=empty,  # the decode path reads the buffer in place
            key_order=None,
            write_rows=write_rows,
            write_src=None,
            trees=[],
            decoding=self._decode_plan(slots, slots_t, lengths_t, longest, min(lengths)),
            tokens=tokens_t,
            logits_index=index,
        )

    def _plan_mixed(
        self,
        nd: int,
        slots: list[int],
        seqlens: list[int],
        tokens: list[int] | None,
        logits_rows: list[int] | None,
        write: list[bool],
        trees: list[tuple[list[int], torch.Tensor] | None],
    ) -> ForwardMetadata:
        """Decoders (the first nd sequences) and pre-fill sequences. Index tensors are built on
        the host with a fixed number of tensor operations whatever the number of sequences (a
        per-sequence loop of small ops costs more than the attention in a pass of a few dozen
        short sequences), then copied to the device in one transfer."""
        W = self.window
        d_slots, p_slots = slots[:nd], slots[nd:]
        p_seqlens, p_write, p_trees = seqlens[nd:], write[nd:], trees[nd:]
        if nd:
            d_starts, d_rows, d_lengths, longest = self._decode_host(d_slots)
        else:
            d_starts, d_rows, d_lengths, longest = [], [], [], 0
        lengths = [self.lengths[s] for s in p_slots]
        # The first new token (position n) sees keys n-W+1 .. n: W-1 of them are cached.
        cached_lens = [min(n, W - 1) for n in lengths]
        slot_t = torch.tensor(p_slots, dtype=torch.long)
        # Cached rows to read, in position order: positions n - n_cached .. n - 1 per sequence.
        seq, pos = _ranges([n - c for n, c in zip(lengths, cached_lens, strict=True)], cached_lens)
        gather_rows = slot_t[seq] * W + pos % W
        # New tokens' positions: consecutive, or length + depth for a token tree.
        token_seq, positions = _ranges(lengths, p_seqlens)
        cu = list(itertools.accumulate(p_seqlens, initial=0))  # new tokens' packed offsets
        depths = [(b, t[0]) for b, t in enumerate(p_trees) if t is not None]
        if depths:
            idx = torch.tensor([i for b, _ in depths for i in range(cu[b], cu[b + 1])])
            positions[idx] = torch.tensor([lengths[b] + d for b, ds in depths for d in ds])
        # Only the last W new tokens of a written sequence survive; writing more would need
        # duplicate rows.
        kept = [min(n_new, W) if w else 0 for n_new, w in zip(p_seqlens, p_write, strict=True)]
        ends = [n + n_new for n, n_new in zip(lengths, p_seqlens, strict=True)]
        wseq, wpos = _ranges([e - k for e, k in zip(ends, kept, strict=True)], kept)
        token_offsets = torch.tensor(cu, dtype=torch.long)
        write_src = nd + token_offsets[:-1][wseq] + (wpos - torch.tensor(lengths)[wseq])
        key_order = self._key_order(cached_lens, p_seqlens)
        tree_masks = [t[1] for t in p_trees if t is not None]
        key_lens = [c + n for c, n in zip(cached_lens, p_seqlens, strict=True)]
        parts = [
            torch.tensor(d_starts, dtype=torch.long),
            positions,
            torch.tensor(d_rows, dtype=torch.long),
            slot_t[wseq] * W + wpos % W,
            torch.arange(nd),
            write_src,
            gather_rows,
            key_order if key_order is not None else torch.empty(0, dtype=torch.long),
            token_offsets,
            torch.tensor(list(itertools.accumulate(key_lens, initial=0))),
            torch.tensor([p_seqlens, cached_lens, lengths], dtype=torch.long).reshape(3, -1),
            token_seq,
            torch.tensor(d_slots, dtype=torch.long),
            torch.tensor(d_lengths, dtype=torch.long),
            torch.tensor(tokens if tokens is not None else [], dtype=torch.long),
            torch.tensor(logits_rows if logits_rows is not None else [], dtype=torch.long),
            *tree_masks,
        ]
        (
            d_pos, p_pos, d_wrows, p_wrows, d_src, p_src, gather_t, key_t, cu_q, cu_k, lens,
            token_seq_t, d_slots_t, d_lengths_t, tokens_t, index_t, *trees_t,
        ) = transfer.upload_ints(parts, self.device)  # fmt: skip
        for slot, n_new, w in zip(p_slots, p_seqlens, p_write, strict=True):
            if w:
                self.lengths[slot] += n_new
        device_trees = iter(trees_t)
        decoding = None
        if nd:
            decoding = self._decode_plan(d_slots, d_slots_t, d_lengths_t, longest, min(d_lengths))
        return ForwardMetadata(
            window=W,
            positions=torch.cat([d_pos, p_pos]) if nd else p_pos,
            seqlens=list(p_seqlens),
            cached_lens=cached_lens,
            start_positions=lengths,
            cu_seqlens_q=cu_q.int(),
            cu_seqlens_k=cu_k.int(),
            gather_rows=gather_t,
            key_order=key_t if key_order is not None else None,
            write_rows=torch.cat([d_wrows, p_wrows]) if nd else p_wrows,
            write_src=torch.cat([d_src, p_src]),
            trees=[next(device_trees).bool() if t is not None else None for t in p_trees],
            decoding=decoding,
            tokens=tokens_t if tokens is not None else None,
            logits_index=index_t if logits_rows is not None else None,
            lens=lens,
            token_seq=token_seq_t,
        )

    def _key_order(self, cached_lens: list[int], seqlens: list[int]) -> torch.Tensor | None:
        """Index into cat([gathered cached keys, new keys]) that yields [cached_b, new_b] per b."""
        if not any(cached_lens):
            return None
        # Sequence b's keys start at its cached rows' offset, then its new tokens' offset.
        total_cached = sum(cached_lens)
        c_off = list(itertools.accumulate(cached_lens, initial=0))
        n_off = list(itertools.accumulate(seqlens, initial=0))
        starts: list[int] = []
        lengths: list[int] = []
        for b, (c, n) in enumerate(zip(cached_lens, seqlens, strict=True)):
            starts += [c_off[b], total_cached + n_off[b]]
            lengths += [c, n]
        return _ranges(starts, lengths)[1]

    def gather(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: ForwardMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sequence keys/values [cached window, new tokens], packed like cu_seqlens_k."""
        if meta.key_order is None:
            return k, v
        ck = self.k[layer].index_select(0, meta.gather_rows)
        cv = self.v[layer].index_select(0, meta.gather_rows)
        return (
            torch.cat([ck, k]).index_select(0, meta.key_order),
            torch.cat([cv, v]).index_select(0, meta.key_order),
        )

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: ForwardMetadata) -> None:
        if meta.write_rows.numel() == 0:
            return
        if meta.write_src is not None:  # decode writes every token, in order: no selection
            k, v = k.index_select(0, meta.write_src), v.index_select(0, meta.write_src)
        at = (self._layer_ids[layer], meta.write_rows)
        self.k.index_put_(at, k)
        self.v.index_put_(at, v)

    def slot_view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer buffers as [n_slots, window, n_kv_heads, head_dim]."""
        shape = (self.n_slots, self.window, *self.k.shape[2:])
        return self.k[layer].view(shape), self.v[layer].view(shape)


@dataclass
class CacheSnapshot:
    """A sequence's cached window, copied out of the buffer (for a reusable prompt prefix)."""

    length: int  # tokens the sequence had seen
    k: torch.Tensor  # [n_layers, min(length, W), n_kv_heads, head_dim], position order
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
