"""Rolling buffer KV cache and the per-forward indexing computed from it.

Each cache slot holds one sequence's keys and values for the last W positions, per layer;
position i lives at row i mod W and overwrites the oldest (paper, section 2). Memory is fixed by
W and the number of slots, never by sequence length.

Every forward pass is planned once here (`RollingCache.plan`): positions, which cached rows each
sequence reads in position order, where new keys go. Attention layers only read the plan.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch

from model.args import ModelArgs
from model.errors import RequestError
from model.memory import cache_rows


@dataclass
class ForwardMetadata:
    """Indexing for one forward pass over packed sequences; built once, read by every layer."""

    window: int
    positions: torch.Tensor  # [T] absolute position of each packed token
    seqlens: list[int]  # new tokens per sequence, packed in this order
    cached_lens: list[int]  # cached keys each sequence reads (its window before this pass)
    start_positions: list[int]  # position of each sequence's first new token
    cu_seqlens_q: torch.Tensor  # [B+1] int32 offsets of new tokens
    cu_seqlens_k: torch.Tensor  # [B+1] int32 offsets of keys (cached + new)
    gather_rows: torch.Tensor  # [sum cached_lens] cache rows to read, in position order
    key_order: torch.Tensor | None  # index into cat([gathered, new]) giving per-sequence keys
    write_rows: torch.Tensor  # cache rows written by this pass
    write_src: torch.Tensor  # packed token index of each written row
    decode: bool  # every sequence adds one token and writes it: attend straight on the buffer
    trees: list[torch.Tensor | None]  # per sequence: ancestor mask [L, L] of a token tree
    slots: torch.Tensor  # [B] int32 cache slot of each sequence (decode path)
    decode_lengths: torch.Tensor  # [B] int32 valid rows per slot after the write (decode path)
    # (first, count) when the decoding sequences sit in consecutive slots, in order: the
    # decode path can then read the buffers as a view instead of copying them.
    slot_range: tuple[int, int] | None = None
    # Decode path: [B, 1, 1, W] valid rows when a sequence is younger than the window (rows past
    # its length hold stale data from an earlier occupant); None when every buffer is full.
    decode_mask: torch.Tensor | None = None
    # Pre-fill path: each sequence's attention mask (None = plain causal), built by the first
    # layer that needs them and read by the others.
    masks: list[torch.Tensor | None] | None = None
    # Pre-fill path as one padded batch (model.attention.PaddedLayout), when the backend pads.
    padded: Any = None

    @property
    def max_seqlen_q(self) -> int:
        return max(self.seqlens)

    @property
    def max_seqlen_k(self) -> int:
        return max(c + s for c, s in zip(self.cached_lens, self.seqlens, strict=True))

    @classmethod
    def fresh(cls, seqlens: list[int], window: int, device: torch.device) -> ForwardMetadata:
        """Plan for sequences starting at position 0 with no cache (a plain full forward)."""
        positions = torch.cat([torch.arange(n) for n in seqlens]).to(device)
        cu = _offsets(seqlens, device)
        empty = torch.empty(0, dtype=torch.long, device=device)
        zeros = [0] * len(seqlens)
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
            write_src=empty,
            decode=False,
            trees=[None] * len(seqlens),
            slots=torch.empty(0, dtype=torch.int32, device=device),
            decode_lengths=torch.empty(0, dtype=torch.int32, device=device),
        )


def _ranges(
    starts: list[int], lengths: list[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence index, value) of the concatenated ranges starts[b] .. starts[b]+lengths[b]-1,
    built with a fixed number of tensor operations whatever the number of ranges."""
    n = torch.tensor(lengths, dtype=torch.long, device=device)
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), n)
    first = torch.tensor(starts, dtype=torch.long, device=device)
    begin = torch.cumsum(n, 0) - n  # where each range starts in the concatenation
    return seq, first[seq] + torch.arange(sum(lengths), device=device) - begin[seq]


def _offsets(lengths: list[int], device: torch.device) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


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

    def restore(self, slot: int, snap: CacheSnapshot) -> None:
        """Put a snapshot into a slot, as if its tokens had just been pre-filled there."""
        self.restore_many([slot], snap)

    def restore_many(self, slots: list[int], snap: CacheSnapshot) -> None:
        """restore() of one snapshot into several slots, in one copy."""
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
        write: list[bool] | None = None,
        trees: list[tuple[list[int], torch.Tensor] | None] | None = None,
    ) -> ForwardMetadata:
        """Plan a pass adding `seqlens[b]` tokens to the sequence in `slots[b]`.

        A sequence with write=False reads its slot but leaves it unchanged. A tree sequence
        (`trees[b] = (depths, ancestor_mask)`) is a token tree hanging off the cached prompt:
        token j sits at position length + depths[j] and sees only its ancestors and itself,
        which scores many continuations of one prompt in one pass. Trees never write.
        Written slots advance their length.

        The index tensors are built with a fixed number of tensor operations whatever the
        number of sequences: a per-sequence loop of small tensor ops costs more than the
        attention itself in a pass of a few dozen short sequences (the classifier's batches).
        """
        trees = trees if trees is not None else [None] * len(slots)
        W = self.window
        write = write if write is not None else [True] * len(slots)
        if all(t is None for t in trees) and all(write) and all(n == 1 for n in seqlens):
            return self._plan_decode(slots)
        written = [s for s, w in zip(slots, write, strict=True) if w]
        if len(set(written)) != len(written):
            raise ValueError("a slot can be written by only one sequence per pass")
        lengths = [self.lengths[s] for s in slots]
        for n, n_new in zip(lengths, seqlens, strict=True):
            if not self.sliding and n + n_new > W:
                raise RequestError(f"sequence of {n + n_new} tokens exceeds the context of {W}")
        for tree, w, n_new in zip(trees, write, seqlens, strict=True):
            if tree is not None and (w or len(tree[0]) != n_new):
                raise ValueError("a token tree is read-only and needs one depth per token")
        # The first new token (position n) sees keys n-W+1 .. n: W-1 of them are cached.
        cached_lens = [min(n, W - 1) for n in lengths]
        dev = self.device
        slot_t = torch.tensor(slots, dtype=torch.long, device=dev)
        # Cached rows to read, in position order: positions n - n_cached .. n - 1 per sequence.
        seq, pos = _ranges(
            [n - c for n, c in zip(lengths, cached_lens, strict=True)], cached_lens, dev
        )
        gather_rows = slot_t[seq] * W + pos % W
        # New tokens' positions: consecutive, or length + depth for a token tree.
        positions = _ranges(lengths, seqlens, dev)[1]
        cu = list(itertools.accumulate(seqlens, initial=0))  # new tokens' packed offsets
        depths = [(b, t[0]) for b, t in enumerate(trees) if t is not None]
        if depths:
            idx = torch.tensor([i for b, _ in depths for i in range(cu[b], cu[b + 1])], device=dev)
            tree_pos = [lengths[b] + d for b, ds in depths for d in ds]
            positions[idx] = torch.tensor(tree_pos, dtype=torch.long, device=dev)
        # Only the last W new tokens of a written sequence survive; writing more would need
        # duplicate rows.
        kept = [min(n_new, W) if w else 0 for n_new, w in zip(seqlens, write, strict=True)]
        ends = [n + n_new for n, n_new in zip(lengths, seqlens, strict=True)]
        wseq, wpos = _ranges([e - k for e, k in zip(ends, kept, strict=True)], kept, dev)
        write_rows = slot_t[wseq] * W + wpos % W
        token_offsets = torch.tensor(cu, dtype=torch.long, device=dev)
        write_src = token_offsets[:-1][wseq] + (wpos - torch.tensor(lengths, device=dev)[wseq])
        key_order = self._key_order(cached_lens, seqlens)
        decode = all(write) and all(n == 1 for n in seqlens)
        for slot, n_new, w in zip(slots, seqlens, write, strict=True):
            if w:
                self.lengths[slot] += n_new
        return ForwardMetadata(
            window=W,
            positions=positions,
            seqlens=list(seqlens),
            cached_lens=cached_lens,
            start_positions=lengths,
            cu_seqlens_q=token_offsets.int(),
            cu_seqlens_k=_offsets(
                [c + s for c, s in zip(cached_lens, seqlens, strict=True)], self.device
            ),
            gather_rows=gather_rows,
            key_order=key_order,
            write_rows=write_rows,
            write_src=write_src,
            decode=decode,
            trees=[t[1].to(self.device) if t is not None else None for t in trees],
            slots=slot_t.int(),
            decode_lengths=torch.tensor(
                [min(self.lengths[s], W) for s in slots], dtype=torch.int32, device=self.device
            ),
        )

    def _plan_decode(self, slots: list[int]) -> ForwardMetadata:
        """The common step: one new token per sequence. Built from plain lists, because this
        runs once per generated token and the general plan's per-sequence tensors add up."""
        if len(set(slots)) != len(slots):
            raise ValueError("a slot can be written by only one sequence per pass")
        W = self.window
        starts = [self.lengths[s] for s in slots]
        if not self.sliding and max(starts) + 1 > W:
            raise RequestError(f"sequence of {max(starts) + 1} tokens exceeds the context of {W}")
        for s in slots:
            self.lengths[s] += 1
        dev = self.device
        n = len(slots)
        empty = torch.empty(0, dtype=torch.long, device=dev)
        lengths = torch.tensor([min(p + 1, W) for p in starts], dtype=torch.int32, device=dev)
        mask = None
        if min(starts) + 1 < W:  # built once here rather than in every layer
            mask = (torch.arange(W, device=dev)[None, :] < lengths[:, None])[:, None, None, :]
        return ForwardMetadata(
            window=W,
            positions=torch.tensor(starts, dtype=torch.long, device=dev),
            seqlens=[1] * n,
            cached_lens=[min(p, W - 1) for p in starts],
            start_positions=starts,
            cu_seqlens_q=torch.arange(n + 1, dtype=torch.int32, device=dev),
            cu_seqlens_k=_offsets([min(p, W - 1) + 1 for p in starts], dev),
            gather_rows=empty,  # the decode path reads the buffer in place
            key_order=None,
            write_rows=torch.tensor(
                [s * W + p % W for s, p in zip(slots, starts, strict=True)], device=dev
            ),
            write_src=torch.arange(n, device=dev),
            decode=True,
            trees=[None] * n,
            slots=torch.tensor(slots, dtype=torch.int32, device=dev),
            decode_lengths=lengths,
            decode_mask=mask,
            slot_range=(slots[0], n) if slots == list(range(slots[0], slots[0] + n)) else None,
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
        return _ranges(starts, lengths, self.device)[1]

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
        if not meta.decode:  # decode writes every token, in order: no selection needed
            k, v = k.index_select(0, meta.write_src), v.index_select(0, meta.write_src)
        self.k[layer].index_copy_(0, meta.write_rows, k)
        self.v[layer].index_copy_(0, meta.write_rows, v)

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
