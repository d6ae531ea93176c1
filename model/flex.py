"""FlexAttention backend (`torch.nn.attention.flex_attention`): the torch-native fast path.

flash-attn has no binary wheel, so most CUDA hosts run without it; FlexAttention generates a
fused, block-sparse kernel from a mask written in Python, with GQA served by `enable_gqa`
(key/value heads are never copied to the query heads).

Window semantics are those of model/attention.py: a query at position i sees keys i-W+1 .. i.
A pre-fill, mixed or label-tree pass attends, for all its pre-fill sequences at once, with one
flex call per layer over

- queries: the pass's pre-fill tokens, packed as they come (no padding per sequence);
- keys: the cached rows of those sequences, read from the rolling buffer in position order
  (`meta.gather_rows`, the plan's index), followed by the pass's new keys. They are *not*
  reordered into per-sequence runs as the SDPA path does: each key's sequence and position are
  per-pass metadata the mask reads, so the one index_select of the cached rows is the only copy.

The mask (`mask_mod`) is: same sequence, key position in the query's window, and for a token
tree (label scoring) the tree's ancestor relation among the new tokens. It and its block mask
are built once per pass by `prepare` (into `meta.flex`, which the layers only read), and every
layer shares them. Blocks of the (query, key) grid that no sequence needs are skipped by the
kernel, so packing many short texts costs what their own tokens cost.

Decode steps (one new token per sequence) stay by default on the SDPA path over the filled
rows of each slot (`SdpaBackend._decode`, handed in as `decode`): after its write a slot's
buffer holds exactly its window, so no mask of positions is needed there, and that path is the
one the graph capture of model/graphs.py was built and measured with (docs/benchmarks.md,
#24). `flex_decode=True` decodes through FlexAttention instead, over every slot's physical rows
in place: the cache's buffers are the keys as they lie ([slots, window] per layer, a view: no
copy of any slot, where SDPA's compiled path copies each decoder's span), the queries are put
at their slots' rows, and the block mask gives each slot the blocks its length covers (idle
slots none, so they cost nothing). Rows past a slot's length are masked; order does not
matter (the buffer holds exactly the window). Not measured on a GPU yet, so opt-in.

`compile_kernel`: FlexAttention run eagerly is a reference implementation that materialises
the scores; compiled, it is the generated kernel. The default compiles on CUDA; on CPU the
compiled kernel costs ~20 s of start-up per shape and the eager one runs, slower than SDPA
(docs/benchmarks.md), so CPU's `auto` stays on SDPA. Compiled passes pad queries and keys to a
multiple of the block size so that the shapes, and the compiles, stay few.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from model.cache import ForwardMetadata, RollingCache

T = torch.Tensor
DecodeFn = Callable[[torch.Tensor, RollingCache, int, ForwardMetadata], torch.Tensor]

BLOCK = 128  # FlexAttention's block size: the unit of sparsity and of padding when compiled

# The eager FlexAttention warns at every first call that it is not the fused kernel; this
# backend runs it eagerly on purpose (CPU, tests), and says so in its docstring instead.
warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")


@dataclass
class FlexDecode:
    """A decode step's attention over every slot's rows, built once per pass."""

    block_mask: BlockMask
    slots: torch.Tensor  # [decoders] long: the slot of each decoder


def decode_mask(meta: ForwardMetadata) -> FlexDecode:
    """Block mask over [slots, window] keys: slot s sees its first length[s] rows (the
    decoders' lengths after their writes; 0 for the other slots, whose blocks are skipped)."""
    d = meta.decoding
    assert d is not None and d.n_slots > 0
    device = d.slots.device
    slots = d.slots.long()
    # Padding decoders share one slot, all with length 1: duplicate writes of one value.
    lengths = torch.zeros(d.n_slots, dtype=torch.int32, device=device).index_copy(
        0, slots, d.lengths.int()
    )
    n_blocks = -(-meta.window // BLOCK)
    kv_num_blocks = ((lengths + BLOCK - 1) // BLOCK).view(d.n_slots, 1, 1)
    kv_indices = (
        torch.arange(n_blocks, dtype=torch.int32, device=device)
        .expand(d.n_slots, 1, 1, n_blocks)
        .contiguous()
    )

    def within(b: T, h: T, qi: T, ki: T) -> T:
        return ki < lengths[b]

    block_mask = BlockMask.from_kv_blocks(
        kv_num_blocks, kv_indices, BLOCK_SIZE=BLOCK, mask_mod=within,
        seq_lengths=(1, meta.window), compute_q_blocks=False,
    )  # fmt: skip
    return FlexDecode(block_mask, slots)


@dataclass
class FlexPass:
    """What the layers read of a pass's pre-fill attention, built once by `prepare`."""

    block_mask: BlockMask
    n_cached: int  # gathered cached keys, ahead of the new keys
    q_len: int  # query rows given to the kernel (padded when compiled)
    k_len: int  # key rows given to the kernel (padded when compiled)


def _padded(n: int, pad: bool) -> int:
    return -(-n // BLOCK) * BLOCK if pad and n else n


def pass_mask(meta: ForwardMetadata, pad: bool) -> tuple[Callable[..., torch.Tensor], int, int]:
    """The pass's mask_mod over (pre-fill query, key) with keys = [gathered cached rows, new
    keys], and the query and key lengths given to the kernel. Tensor ops on the device from
    the plan's uploaded indices: no host sync."""
    assert meta.lens is not None and meta.token_seq is not None
    device = meta.positions.device
    nd = meta.n_decode
    B = len(meta.seqlens)
    n_new = sum(meta.seqlens)
    n_cached = sum(meta.cached_lens)
    q_len, k_len = _padded(n_new, pad), _padded(n_cached + n_new, pad)
    seqlens, cached, starts = meta.lens[0], meta.lens[1], meta.lens[2]
    q_seq_real = meta.token_seq
    q_pos_real = meta.positions[nd:]
    # Cached keys: sequence b's run of cached[b] rows holds positions starts[b]-cached[b] ..
    # starts[b]-1 (the plan's gather order).
    seq_ids = torch.arange(B, device=device)
    c_seq = torch.repeat_interleave(seq_ids, cached, output_size=n_cached)
    c_first = torch.cumsum(cached, 0) - cached
    c_pos = starts[c_seq] - cached[c_seq] + torch.arange(n_cached, device=device) - c_first[c_seq]
    # Padding: queries of sequence -1, keys of sequence -2, which match nothing.
    q_pad, k_pad = q_len - n_new, k_len - n_cached - n_new
    q_seq = torch.cat([q_seq_real, q_seq_real.new_full((q_pad,), -1)])
    q_pos = torch.cat([q_pos_real, q_pos_real.new_zeros(q_pad)])
    k_seq = torch.cat([c_seq, q_seq_real, q_seq_real.new_full((k_pad,), -2)])
    k_pos = torch.cat([c_pos, q_pos_real, q_pos_real.new_zeros(k_pad)])
    window = meta.window
    trees = [(b, t) for b, t in enumerate(meta.trees) if t is not None]
    if not trees:

        def band(
            b: torch.Tensor, h: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor
        ) -> torch.Tensor:
            qp, kp = q_pos[qi], k_pos[ki]
            return (q_seq[qi] == k_seq[ki]) & (kp <= qp) & (kp > qp - window)

        return band, q_len, k_len
    # Token trees: new token j of tree sequence b sees new token i of b when tree[j, i]. The
    # trees' masks are flattened into one vector; a query row's tree starts at `t_base` and is
    # `t_len` wide (0: no tree, then every new token of its window counts).
    cu_q = torch.cumsum(seqlens, 0) - seqlens
    local = torch.arange(n_new, device=device) - cu_q[q_seq_real]  # offset in its sequence
    t_len_seq = torch.zeros(B, dtype=torch.long, device=device)
    t_base_seq = torch.zeros(B, dtype=torch.long, device=device)
    flat: list[torch.Tensor] = []
    base = 0
    for b, t in trees:
        n = meta.seqlens[b]
        t_len_seq[b], t_base_seq[b] = n, base
        flat.append(t.reshape(-1))
        base += n * n
    tree_flat = torch.cat(flat)
    q_tree_len = torch.cat([t_len_seq[q_seq_real], t_len_seq.new_zeros(q_pad)])
    q_tree_at = torch.cat([t_base_seq[q_seq_real] + local * t_len_seq[q_seq_real],
                           local.new_zeros(q_pad)])  # fmt: skip
    k_local = torch.cat([local.new_zeros(n_cached), local, local.new_zeros(k_pad)])
    is_new = torch.arange(k_len, device=device) >= n_cached
    last = tree_flat.numel() - 1

    def band_and_tree(
        b: torch.Tensor, h: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor
    ) -> torch.Tensor:
        qp, kp = q_pos[qi], k_pos[ki]
        in_band = (q_seq[qi] == k_seq[ki]) & (kp <= qp) & (kp > qp - window)
        ancestor = tree_flat[(q_tree_at[qi] + k_local[ki]).clamp(0, last)]
        return in_band & (~is_new[ki] | (q_tree_len[qi] == 0) | ancestor)

    return band_and_tree, q_len, k_len


class FlexBackend:
    """Pre-fill, mixed and label-tree passes through FlexAttention; decode through `decode`."""

    name = "flex"

    def __init__(
        self, decode: DecodeFn, *, compile_kernel: bool, cuda: bool = False,
        flex_decode: bool = False,
    ) -> None:  # fmt: skip
        self._decode = decode
        self.compile_kernel = compile_kernel
        self.flex_decode = flex_decode
        # Pre-fill passes come in many lengths (padded to whole blocks, still up to 32 x 64
        # pairs for a 4096 window): on CUDA the kernel becomes shape-generic after its second
        # shape (dynamo's automatic dynamic), instead of one compile per pair while serving.
        # On CPU shapes stay static: torch 2.13's C++ flex template fails to compile with
        # symbolic sizes (seen here: "cur_kvSplitSize7 was not declared").
        self._flex = (
            torch.compile(flex_attention, fullgraph=True, dynamic=None if cuda else False)
            if compile_kernel
            else flex_attention
        )

    def prepare(self, meta: ForwardMetadata, dtype: torch.dtype) -> None:
        if meta.prepared:
            return
        meta.prepared = True
        if self.flex_decode and meta.decoding is not None:
            meta.flex_decode = decode_mask(meta)
        if not meta.seqlens:
            return
        mask_mod, q_len, k_len = pass_mask(meta, self.compile_kernel)
        device = meta.positions.device
        # Compiled on CUDA: the dense (query, key) evaluation that finds the live blocks is
        # then one fused kernel instead of a few dozen ops over the whole grid.
        block_mask = create_block_mask(
            mask_mod, None, None, q_len, k_len, device=device,
            _compile=self.compile_kernel and device.type == "cuda",
        )  # fmt: skip
        meta.flex = FlexPass(block_mask, sum(meta.cached_lens), q_len, k_len)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: ForwardMetadata,
        cache: RollingCache | None,
        layer: int,
    ) -> torch.Tensor:
        nd = meta.n_decode if cache is not None else 0
        if cache is not None and nd == q.shape[0]:
            cache.write(layer, k, v, meta)
            return self._decode_step(q, cache, layer, meta)
        fp = meta.flex
        assert isinstance(fp, FlexPass), "prepare() builds the pass's mask before the forward"
        keys, values = k[nd:], v[nd:]
        if cache is not None and fp.n_cached:
            # The pre-fill sequences' cached windows, read before this pass writes its keys.
            keys = torch.cat([cache.k[layer].index_select(0, meta.gather_rows), keys])
            values = torch.cat([cache.v[layer].index_select(0, meta.gather_rows), values])
        if cache is not None:
            cache.write(layer, k, v, meta)
        out = self._prefill(q[nd:], keys, values, fp)
        if nd:
            assert cache is not None
            out = torch.cat([self._decode_step(q[:nd], cache, layer, meta), out])
        return out

    def _decode_step(
        self, q: torch.Tensor, cache: RollingCache, layer: int, meta: ForwardMetadata
    ) -> torch.Tensor:
        fd = meta.flex_decode
        if not isinstance(fd, FlexDecode):
            return self._decode(q, cache, layer, meta)
        kc, vc = cache.slot_view(layer)  # [slots, window, kv_heads, D]: the buffer, in place
        n_slots, _, kv_heads, _ = kc.shape
        queries = q.new_zeros(n_slots, *q.shape[1:]).index_copy(0, fd.slots, q)
        o = self._flex(
            queries[:, :, None],  # [slots, heads, 1, D]
            kc.transpose(1, 2),
            vc.transpose(1, 2),
            block_mask=fd.block_mask,
            enable_gqa=q.shape[1] != kv_heads,
        )
        assert isinstance(o, torch.Tensor)
        return o[:, :, 0].index_select(0, fd.slots)

    def _prefill(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, fp: FlexPass
    ) -> torch.Tensor:
        n = q.shape[0]
        if fp.q_len > n:
            q = torch.cat([q, q.new_zeros(fp.q_len - n, *q.shape[1:])])
        if fp.k_len > keys.shape[0]:
            pad = keys.new_zeros(fp.k_len - keys.shape[0], *keys.shape[1:])
            keys, values = torch.cat([keys, pad]), torch.cat([values, pad])
        # [L, heads, D] -> [1, heads, L, D]
        o = self._flex(
            q.transpose(0, 1)[None],
            keys.transpose(0, 1)[None],
            values.transpose(0, 1)[None],
            block_mask=fp.block_mask,
            enable_gqa=q.shape[1] != keys.shape[1],
        )
        assert isinstance(o, torch.Tensor)
        return o[0, :, :n].transpose(0, 1)
