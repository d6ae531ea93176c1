"""flash-attn's two kernels as `torch.library` custom ops, so that compile and CUDA graphs
trace through them.

Dynamo cannot trace flash-attn's Python wrappers (`flash_attn_with_kvcache` breaks the graph
of a compiled decode step, a known upstream issue); an opaque custom op with a fake (meta)
implementation is what it can: the fake gives the output's shape, the real call runs inside
the graph. On CUDA tensors the ops call flash-attn; elsewhere they run a reference in plain
torch with the same semantics, which is what `torch.library.opcheck` and the CPU tests check
(tests/test_flash_ops.py).

Semantics (flash-attn 2.x):
- `varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window)`: packed
  sequences; query i of a sequence with Lq queries and Lk keys sits at key position
  i + Lk - Lq (the causal band aligned bottom-right) and sees the `window` keys ending there.
- `kvcache(q, k_cache, v_cache, cache_seqlens, cache_batch_idx)`: one query per sequence b,
  which sees the first cache_seqlens[b] rows of cache entry cache_batch_idx[b].
Both with grouped-query attention (fewer key/value heads than query heads).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.nn.functional as F

_flash_module: Any = None


def _flash() -> Any:
    global _flash_module
    if _flash_module is None:
        _flash_module = importlib.import_module("flash_attn")
    return _flash_module


def varlen_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    window: int,
) -> torch.Tensor:
    out = torch.empty_like(q)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qs, ks, vs = q[cq[b] : cq[b + 1]], k[ck[b] : ck[b + 1]], v[ck[b] : ck[b + 1]]
        lq, lk = qs.shape[0], ks.shape[0]
        i = torch.arange(lq, device=q.device)[:, None] + (lk - lq)
        j = torch.arange(lk, device=q.device)[None, :]
        allowed = (j <= i) & (j > i - window)
        o = F.scaled_dot_product_attention(
            qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1),
            attn_mask=allowed, enable_gqa=qs.shape[1] != ks.shape[1],
        )  # fmt: skip
        out[cq[b] : cq[b + 1]] = o.transpose(0, 1)
    return out


def kvcache_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    cache_batch_idx: torch.Tensor,
) -> torch.Tensor:
    out = torch.empty_like(q)
    for b, (n, entry) in enumerate(zip(cache_seqlens.tolist(), cache_batch_idx.tolist(),
                                       strict=True)):  # fmt: skip
        ks, vs = k_cache[entry, :n].transpose(0, 1), v_cache[entry, :n].transpose(0, 1)
        o = F.scaled_dot_product_attention(
            q[b][:, None], ks, vs, enable_gqa=q.shape[1] != ks.shape[0]
        )
        out[b] = o[:, 0]
    return out


@torch.library.custom_op("mistral_moderation::flash_varlen", mutates_args=())
def varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    window: int,
) -> torch.Tensor:
    """Packed causal sliding-window attention: q [T, H, D], k/v [Tk, KV, D] -> [T, H, D]."""
    if not q.is_cuda:
        return varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, window)
    return _flash().flash_attn_varlen_func(
        q, k, v,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        causal=True, window_size=(window - 1, 0),
    )  # fmt: skip


@varlen.register_fake
def _varlen_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    window: int,
) -> torch.Tensor:
    return torch.empty_like(q)


@torch.library.custom_op("mistral_moderation::flash_kvcache", mutates_args=())
def kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    cache_batch_idx: torch.Tensor,
) -> torch.Tensor:
    """One query per sequence over its cache entry: q [B, H, D], caches [N, rows, KV, D]."""
    if not q.is_cuda:
        return kvcache_reference(q, k_cache, v_cache, cache_seqlens, cache_batch_idx)
    out = _flash().flash_attn_with_kvcache(
        q[:, None], k_cache, v_cache,
        cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx, causal=True,
    )  # fmt: skip
    return out[:, 0].contiguous()


@kvcache.register_fake
def _kvcache_fake(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    cache_batch_idx: torch.Tensor,
) -> torch.Tensor:
    return torch.empty_like(q)
