"""Attention backends: flash-attn on CUDA, torch scaled_dot_product_attention elsewhere.

Both see the same inputs (packed queries, keys, values and the pass's ForwardMetadata) and the
same window semantics: a query at position i attends to keys i-W+1 .. i, itself included.

A pass packs its decoding sequences first, then its pre-fill sequences:
- decode (a sequence adds one token): write the new key first, then attend to the slot's
  buffer as it is. After the write the buffer holds exactly the window, and attention does not
  care about key order, so the rolling buffer needs no unrolling. Only the filled rows are read
  (`DecodePlan.span`): before a slot wraps they are a prefix of its rows.
- pre-fill (chunks, token trees, fresh sequences): gather each sequence's cached window in
  position order, append the new keys, attend with a bottom-right-aligned causal band. Only
  these sequences' windows are copied; decoders in the same pass are not.
Every mask a pass needs is built by `prepare`, before the layers, which only read it.
"""

from __future__ import annotations

import importlib
import itertools
import logging
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from model import flash_ops
from model.cache import ForwardMetadata, RollingCache
from model.errors import EngineError
from model.flex import FlexBackend


class AttentionBackend(Protocol):
    name: str

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: ForwardMetadata,
        cache: RollingCache | None,
        layer: int,
    ) -> torch.Tensor:
        """Attention output [T, n_heads, head_dim] for packed q [T, n_heads, head_dim]."""
        ...

    def prepare(self, meta: ForwardMetadata, dtype: torch.dtype) -> None:
        """Build what the layers will read (masks, layouts) into meta, once per pass."""
        ...


def band_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """Bool [..., Tq, Tk]: a query at position i sees key positions i-W+1 .. i. Positions are
    [T] for one sequence or [B, T] for a padded batch."""
    q = q_pos[..., :, None]
    k = k_pos[..., None, :]
    return (k <= q) & (k > q - window)


def sequence_mask(meta: ForwardMetadata, b: int, q_pos: torch.Tensor) -> torch.Tensor | None:
    """Mask of pre-fill sequence b over [its cached window, its new tokens]; None when plain
    causal."""
    n_cached, n_new, start = meta.cached_lens[b], meta.seqlens[b], meta.start_positions[b]
    tree = meta.trees[b]
    if tree is None and n_cached == 0 and n_new <= meta.window:
        return None
    cached_pos = torch.arange(start - n_cached, start, device=q_pos.device)
    mask = band_mask(q_pos, torch.cat([cached_pos, q_pos]), meta.window)
    if tree is not None:
        mask[:, n_cached:] &= tree
    return mask


@dataclass
class PaddedLayout:
    """A pre-fill pass as one padded batch: every sequence's queries and keys in a row of their
    own, so that each layer makes one SDPA call instead of one per sequence."""

    q_index: torch.Tensor  # [B * Tq] pre-fill query row of each padded query (0 for padding)
    k_index: torch.Tensor  # [B * Tk] key row of each padded key (0 for padding)
    out_index: torch.Tensor  # [T] padded query slot of each pre-fill query, in packed order
    mask: torch.Tensor  # [B, 1, Tq, Tk] window band, token trees, padding (bool or additive)
    batch: int
    max_q: int
    max_k: int


def padded_layout(meta: ForwardMetadata) -> PaddedLayout:
    """Build the padded form of a pass's pre-fill sequences with tensor ops on the device, from
    the plan's uploaded indices (no per-sequence attention calls, no host sync)."""
    assert meta.lens is not None and meta.token_seq is not None
    device = meta.positions.device
    seqlens, cached, starts = meta.lens[0], meta.lens[1], meta.lens[2]
    B, Tq = len(meta.seqlens), meta.max_seqlen_q
    Tk = meta.max_seqlen_k
    positions = meta.positions[meta.n_decode :]
    cu_q = meta.cu_seqlens_q[:-1].long()
    cu_k = meta.cu_seqlens_k[:-1].long()
    jq = torch.arange(Tq, device=device)
    jk = torch.arange(Tk, device=device)
    valid_q = jq[None, :] < seqlens[:, None]  # [B, Tq]
    valid_k = jk[None, :] < (cached + seqlens)[:, None]  # [B, Tk]
    q_index = torch.where(valid_q, cu_q[:, None] + jq[None, :], 0)
    k_index = torch.where(valid_k, cu_k[:, None] + jk[None, :], 0)
    q_pos = positions[q_index]  # [B, Tq]
    # Key j of sequence b: a cached position (j < cached) or its (j - cached)-th new token.
    is_cached = jk[None, :] < cached[:, None]
    new_row = torch.where(valid_k & ~is_cached, cu_q[:, None] + jk[None, :] - cached[:, None], 0)
    k_pos = torch.where(is_cached, starts[:, None] - cached[:, None] + jk[None, :],
                        positions[new_row])  # fmt: skip
    mask = band_mask(q_pos, k_pos, meta.window) & valid_k[:, None, :]
    for b, tree in enumerate(meta.trees):
        if tree is not None:
            c, n = meta.cached_lens[b], meta.seqlens[b]
            mask[b, :n, c : c + n] &= tree
    # Padding queries see one key so that SDPA has no empty row (their output is dropped).
    mask[:, :, 0] |= ~valid_q
    # Packed pre-fill token t of sequence b at offset j sits at padded slot b * Tq + j.
    seq = meta.token_seq
    out_index = seq * Tq + torch.arange(seq.numel(), device=device) - cu_q[seq]
    return PaddedLayout(
        q_index=q_index.reshape(-1),
        k_index=k_index.reshape(-1),
        out_index=out_index,
        mask=mask[:, None],
        batch=B,
        max_q=Tq,
        max_k=Tk,
    )


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as the additive float mask the CUDA efficient SDPA kernel takes (converted
    once per pass here, not by SDPA in every layer)."""
    return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool = False,
) -> torch.Tensor:
    """SDPA over [B, H, L, D] with GQA (k/v have fewer heads). With a mask on CUDA the key/value
    heads are expanded here: `enable_gqa` with a mask is served only by the math kernel there,
    expanded heads and an additive mask by the memory-efficient one. On CPU enable_gqa is the
    faster form."""
    H, KV = q.shape[1], k.shape[1]
    if q.is_cuda and mask is not None and H != KV:
        B, _, L, D = k.shape
        k = k[:, :, None].expand(B, KV, H // KV, L, D).reshape(B, H, L, D)
        v = v[:, :, None].expand(B, KV, H // KV, L, D).reshape(B, H, L, D)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=H != KV
    )


class SdpaBackend:
    """torch scaled_dot_product_attention without computing padding where it would cost.

    Pre-fill passes run as one padded SDPA call per layer when the sequences are of similar
    size (the classifier's batches: a few dozen texts and their label trees), which removes the
    per-sequence Python and kernel-launch overhead that dominates such passes; very uneven
    passes (one long prompt among short ones) run one call per sequence instead, so that no
    padding is computed.
    """

    name = "sdpa"
    # "auto": padded when the padded work is at most PAD_WASTE times the real work.
    PAD_WASTE = 2.0

    def __init__(self, padding: str = "auto"):
        if padding not in ("auto", "always", "never"):
            raise ValueError(f"padding must be auto, always or never, not {padding!r}")
        self.padding = padding

    def prepare(self, meta: ForwardMetadata, dtype: torch.dtype) -> None:
        if meta.prepared:
            return
        meta.prepared = True
        if not meta.seqlens:
            return
        cuda = meta.positions.device.type == "cuda"
        if self._use_padded(meta):
            lay = padded_layout(meta)
            if cuda:
                lay.mask = additive(lay.mask, dtype)
            meta.padded = lay
            return
        offsets = list(itertools.accumulate(meta.seqlens, initial=meta.n_decode))
        masks = [
            sequence_mask(meta, b, meta.positions[offsets[b] : offsets[b + 1]])
            for b in range(len(meta.seqlens))
        ]
        meta.masks = [additive(m, dtype) if cuda and m is not None else m for m in masks]

    def _use_padded(self, meta: ForwardMetadata) -> bool:
        if self.padding == "never" or len(meta.seqlens) == 1:
            return False
        if self.padding == "auto":
            real = sum(n * (n + c) for n, c in zip(meta.seqlens, meta.cached_lens, strict=True))
            padded = len(meta.seqlens) * meta.max_seqlen_q * meta.max_seqlen_k
            if padded > self.PAD_WASTE * real:
                return False
        return True

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: ForwardMetadata,
        cache: RollingCache | None,
        layer: int,
    ) -> torch.Tensor:
        if cache is None:
            return self._prefill(q, k, v, meta)
        nd = meta.n_decode
        if nd == q.shape[0]:
            cache.write(layer, k, v, meta)
            return self._decode(q, cache, layer, meta)
        # Pre-fill sequences read their cached windows before this pass's keys are written.
        keys, values = cache.gather(layer, k[nd:], v[nd:], meta)
        cache.write(layer, k, v, meta)
        out = self._prefill(q[nd:], keys, values, meta)
        if nd:
            out = torch.cat([self._decode(q[:nd], cache, layer, meta), out])
        return out

    def _prefill(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, meta: ForwardMetadata
    ) -> torch.Tensor:
        if meta.padded is not None:
            return self._padded(q, keys, values, meta)
        return self._per_sequence(q, keys, values, meta)

    @staticmethod
    def _padded(
        q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, meta: ForwardMetadata
    ) -> torch.Tensor:
        lay = meta.padded
        assert lay is not None
        H, D = q.shape[1], q.shape[2]
        KV = keys.shape[1]
        qs = q.index_select(0, lay.q_index).view(lay.batch, lay.max_q, H, D).transpose(1, 2)
        ks = keys.index_select(0, lay.k_index).view(lay.batch, lay.max_k, KV, D).transpose(1, 2)
        vs = values.index_select(0, lay.k_index).view(lay.batch, lay.max_k, KV, D).transpose(1, 2)
        o = sdpa(qs, ks, vs, lay.mask)
        return o.transpose(1, 2).reshape(-1, H, D).index_select(0, lay.out_index)

    @staticmethod
    def _per_sequence(
        q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, meta: ForwardMetadata
    ) -> torch.Tensor:
        assert meta.masks is not None, "prepare() builds the masks before the forward"
        out = torch.empty_like(q)
        q_off = k_off = 0
        for b, (n_new, n_cached) in enumerate(zip(meta.seqlens, meta.cached_lens, strict=True)):
            qs = q[q_off : q_off + n_new].transpose(0, 1)[None]
            ks = keys[k_off : k_off + n_cached + n_new].transpose(0, 1)[None]
            vs = values[k_off : k_off + n_cached + n_new].transpose(0, 1)[None]
            mask = meta.masks[b]
            # Without a mask the band is plain causal: is_causal lets SDPA skip building one.
            o = sdpa(qs, ks, vs, mask, is_causal=mask is None)
            out[q_off : q_off + n_new] = o[0].transpose(0, 1)
            q_off += n_new
            k_off += n_cached + n_new
        return out

    @staticmethod
    def _decode(
        q: torch.Tensor, cache: RollingCache, layer: int, meta: ForwardMetadata
    ) -> torch.Tensor:
        d = meta.decoding
        assert d is not None
        if d.views is not None:
            # Consecutive slots (the usual case): a view, no copy of the buffers.
            ks, vs = d.views[0][layer], d.views[1][layer]  # [B, kv_heads, span, D]
        else:
            kc, vc = cache.slot_view(layer)
            ks = kc[:, : d.span].index_select(0, d.slots).transpose(1, 2)
            vs = vc[:, : d.span].index_select(0, d.slots).transpose(1, 2)
        B, H, D = q.shape
        # GQA for one query token: the query heads sharing a key/value head become that head's
        # query rows ([B, kv_heads, group, D]); measured 2x faster than enable_gqa here, and
        # on CUDA no head expansion is needed for the efficient kernel.
        qs = q.reshape(B, ks.shape[1], H // ks.shape[1], D)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=d.mask)
        return o.reshape(B, H, D)


class FlashBackend:
    """flash-attn 2: varlen kernel with window_size for pre-fill, kvcache kernel for decode,
    called as the custom ops of model/flash_ops.py, which compiled and captured steps trace
    through (on CPU tensors those run their plain-torch reference)."""

    name = "flash"

    def __init__(self) -> None:
        # Token trees (label scoring) need arbitrary masks, which flash-attn has no form for;
        # those passes are a few dozen tokens, so SDPA serves them.
        self._trees = SdpaBackend()

    def prepare(self, meta: ForwardMetadata, dtype: torch.dtype) -> None:
        if any(t is not None for t in meta.trees):
            self._trees.prepare(meta, dtype)
        meta.prepared = True

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: ForwardMetadata,
        cache: RollingCache | None,
        layer: int,
    ) -> torch.Tensor:
        if any(t is not None for t in meta.trees):
            return self._trees.attend(q, k, v, meta, cache, layer)
        nd = meta.n_decode if cache is not None else 0
        if cache is not None and nd == q.shape[0]:
            cache.write(layer, k, v, meta)
            return self._decode(q, cache, layer, meta)
        keys, values = cache.gather(layer, k[nd:], v[nd:], meta) if cache is not None else (k, v)
        if cache is not None:
            cache.write(layer, k, v, meta)
        # causal=True aligns the band bottom-right when keys outnumber queries (flash-attn >= 2.1),
        # which is what a chunk attending to its cached window needs.
        out = flash_ops.varlen(
            q[nd:],
            keys,
            values,
            meta.cu_seqlens_q,
            meta.cu_seqlens_k,
            meta.max_seqlen_q,
            meta.max_seqlen_k,
            meta.window,
        )
        if nd:
            assert cache is not None
            out = torch.cat([self._decode(q[:nd], cache, layer, meta), out])
        return out

    def _decode(
        self, q: torch.Tensor, cache: RollingCache, layer: int, meta: ForwardMetadata
    ) -> torch.Tensor:
        d = meta.decoding
        assert d is not None
        kc, vc = cache.slot_view(layer)
        # The buffer already holds exactly the window (see module docstring), so no
        # window_size is needed; cache_batch_idx maps each query to its slot, and the kernel
        # reads only cache_seqlens rows of it.
        return flash_ops.kvcache(q, kc, vc, d.lengths, d.slots)


_log = logging.getLogger(__name__)
_fallback_logged = False  # the auto fallback is explained once per process, not per engine


def flash_import_error() -> str | None:
    """Why flash-attn cannot be used here, or None when its kernels import.

    Found on disk is not enough: a wheel built for another torch or CUDA raises at import
    (ImportError for an undefined symbol, OSError for a missing library, RuntimeError from
    its own version checks), so the import itself is the test.
    """
    try:
        module = importlib.import_module("flash_attn")
        module.flash_attn_varlen_func  # noqa: B018
        module.flash_attn_with_kvcache  # noqa: B018
    except ModuleNotFoundError as exc:
        if exc.name == "flash_attn":
            return "flash-attn is not installed"
        return f"flash-attn failed to import: {type(exc).__name__}: {exc}"
    except Exception as exc:  # whatever a broken extension raises, auto falls back
        return f"flash-attn failed to import: {type(exc).__name__}: {exc}"
    return None


def flex_backend(
    device: torch.device, compile_kernel: bool | None = None, *, flex_decode: bool = False
) -> FlexBackend:
    """FlexAttention for pre-fill, mixed and tree passes; decode through SDPA over the filled
    rows, or (flex_decode) FlexAttention over every slot's rows in place; the kernel compiled
    on CUDA unless told (see model/flex.py)."""
    if compile_kernel is None:
        compile_kernel = device.type == "cuda"
    return FlexBackend(
        SdpaBackend._decode, compile_kernel=compile_kernel, cuda=device.type == "cuda",
        flex_decode=flex_decode,
    )  # fmt: skip


def select_backend(
    name: str, device: torch.device, dtype: torch.dtype = torch.bfloat16
) -> AttentionBackend:
    """`auto` picks flash-attn when CUDA, a half dtype and a working flash-attn are present,
    else FlexAttention on CUDA (saying why once) and SDPA on CPU, where it measured faster
    than flex (docs/benchmarks.md, #24)."""
    global _fallback_logged
    if name == "sdpa":
        return SdpaBackend()
    if name == "flex":
        return flex_backend(device)
    if name not in ("flash", "auto"):
        raise EngineError(f"unknown attention backend {name!r}; choose auto, flash, flex or sdpa")
    if device.type != "cuda":
        if name == "flash":
            raise EngineError(
                "attention backend 'flash' needs CUDA, fp16/bf16 weights and the flash-attn "
                f"package (device={device}, dtype={dtype})"
            )
        return SdpaBackend()
    if dtype not in (torch.float16, torch.bfloat16):
        if name == "flash":
            raise EngineError(
                "attention backend 'flash' needs CUDA, fp16/bf16 weights and the flash-attn "
                f"package (device={device}, dtype={dtype})"
            )
        return flex_backend(device)
    error = flash_import_error()
    if error is None:
        return FlashBackend()
    if name == "flash":
        raise EngineError(f"attention backend 'flash' is unavailable: {error}")
    if not _fallback_logged:
        _fallback_logged = True
        level = logging.INFO if error == "flash-attn is not installed" else logging.WARNING
        _log.log(level, "attention backend auto: using flex on %s, %s", device, error)
    return flex_backend(device)
