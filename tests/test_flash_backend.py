"""The flash-attn backend.

On CUDA with flash-attn installed: real kernels against SDPA. Everywhere: the backend's calls
(custom ops whose CPU reference is checked against these fakes in tests/test_flash_ops.py)
against a reference written from flash-attn's documented semantics (varlen with a
bottom-right causal band of `window_size`, kvcache with `cache_seqlens` and `cache_batch_idx`),
so the indexing the GPU path relies on is exercised on every CI run.
"""

from __future__ import annotations

import math

import pytest
import torch

from model import Engine, ModelArgs
from model.attention import FlashBackend, SdpaBackend
from model.cache import ForwardMetadata
from model.demo import random_weights
from model.transformer import Transformer

W = 8
ARGS = ModelArgs(
    dim=48, n_layers=2, head_dim=8, hidden_dim=96, n_heads=6, n_kv_heads=2, norm_eps=1e-5,
    vocab_size=300, sliding_window=W, max_seq_len=1024,
)  # fmt: skip


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """Plain softmax attention for one sequence: q [Lq, H, D], k/v [Lk, Hkv, D]."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v.float()).to(q.dtype)


def fake_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal, window_size
):  # type: ignore[no-untyped-def]
    """flash_attn_varlen_func as documented: with causal and Lk > Lq the mask is aligned to
    the bottom-right; window_size=(left, right) keeps keys j in
    i+Lk-Lq-left <= j <= i+Lk-Lq+right."""
    assert causal
    left, right = window_size
    out = torch.empty_like(q)
    for b in range(len(cu_seqlens_q) - 1):
        qs, qe = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        ks, ke = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        lq, lk = qe - qs, ke - ks
        i = torch.arange(lq)[:, None] + (lk - lq)
        j = torch.arange(lk)[None, :]
        allowed = (j <= i + right) & (j >= i - left)
        out[qs:qe] = _attend(q[qs:qe], k[ks:ke], v[ks:ke], allowed)
    return out


def fake_kvcache(q, k_cache, v_cache, *, cache_seqlens, cache_batch_idx, causal):  # type: ignore[no-untyped-def]
    """flash_attn_with_kvcache without new k/v: query b attends to the first cache_seqlens[b]
    rows of cache entry cache_batch_idx[b]."""
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        n = int(cache_seqlens[b])
        entry = int(cache_batch_idx[b])
        allowed = torch.ones(q.shape[1], n, dtype=torch.bool)
        out[b] = _attend(q[b], k_cache[entry, :n], v_cache[entry, :n], allowed)
    return out


def make_model() -> Transformer:
    with torch.device("meta"):
        m = Transformer(ARGS)
    m.load_state_dict(random_weights(ARGS, seed=3), assign=True)
    return m.eval()


def full_logits(model: Transformer, tokens: list[int]) -> torch.Tensor:
    meta = ForwardMetadata.fresh([len(tokens)], W, torch.device("cpu"))
    return model(torch.tensor(tokens), meta, backend=SdpaBackend())


def test_flash_backend_calls_match_flash_semantics_on_cpu() -> None:
    """On CPU the backend's custom ops (model/flash_ops.py) run their reference, which
    tests/test_flash_ops.py checks against the documented-semantics fakes above."""
    model = make_model()
    engine = Engine(model, max_batch_size=3, score_batch_size=2, chunk_size=5, backend="sdpa")
    engine.backend = FlashBackend()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (3 * W + 1, 5, 2 * W)]
    # Pre-fill through the varlen kernel, then decode through the kvcache kernel past the window.
    generated = engine.generate(prompts, 3 * W, stop_tokens=frozenset())
    reference = Engine(model, max_batch_size=3, score_batch_size=2, backend="sdpa")
    assert generated == reference.generate(prompts, 3 * W, stop_tokens=frozenset())
    # Scoring trees go through SDPA inside the flash backend; chunked pre-fill through varlen.
    conts = [[4, 5], [4, 6, 7], [8]]
    assert engine.score(prompts[0], conts) == pytest.approx(
        reference.score(prompts[0], conts), abs=1e-4
    )
    for prompt, new in zip(prompts, generated, strict=True):
        tokens = prompt + new
        logits = full_logits(model, tokens[:-1])
        assert logits[len(prompt) - 1 :].argmax(-1).tolist() == new


def test_flash_backend_is_not_chosen_without_cuda() -> None:
    from model.attention import select_backend

    assert select_backend("auto", torch.device("cpu"), torch.bfloat16).name == "sdpa"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_flash_attn_equals_sdpa_on_gpu() -> None:
    pytest.importorskip("flash_attn", reason="needs the flash-attn package (the gpu extra)")
    model = make_model().to("cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (3 * W + 1, 5, 2 * W)]
    flash = Engine(model, max_batch_size=3, score_batch_size=2, chunk_size=5, backend="flash")
    sdpa = Engine(model, max_batch_size=3, score_batch_size=2, chunk_size=5, backend="sdpa")
    for prompt in prompts:
        conts = [[4, 5], [4, 6, 7], [8]]
        assert flash.score(prompt, conts) == pytest.approx(sdpa.score(prompt, conts), abs=5e-2)
    slot = [0]
    for prompt in prompts:
        a = flash.passes.forward(slot, [prompt], logits_rows=list(range(len(prompt))))
        b = sdpa.passes.forward(slot, [prompt], logits_rows=list(range(len(prompt))))
        flash.cache.reset(0)
        sdpa.cache.reset(0)
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)
