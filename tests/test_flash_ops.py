"""flash-attn's kernels as torch.library custom ops (model/flash_ops.py), checked on CPU with
their plain-torch reference: the ops' registration (`torch.library.opcheck`: schema, fake
implementation, dispatch), the reference against flash-attn's documented semantics, and a
forward pass through them compiled with `fullgraph=True` (dynamo does not trace flash-attn's
own wrappers)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from model import Engine, flash_ops
from model.attention import FlashBackend, SdpaBackend
from tests.test_flash_backend import ARGS, W, fake_kvcache, fake_varlen, make_model


def varlen_args() -> tuple[object, ...]:
    g = torch.Generator().manual_seed(0)
    q_lens, k_lens = [3, 5, 1], [3, 9, 6]  # fresh, a chunk after its cached window, a token
    q = torch.randn(sum(q_lens), 6, 8, generator=g)
    k = torch.randn(sum(k_lens), 2, 8, generator=g)
    v = torch.randn(sum(k_lens), 2, 8, generator=g)
    cu_q = torch.tensor([0, 3, 8, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 3, 12, 18], dtype=torch.int32)
    return (q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), 4)


def kvcache_args() -> tuple[object, ...]:
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 6, 8, generator=g)
    kc = torch.randn(4, 10, 2, 8, generator=g)
    vc = torch.randn(4, 10, 2, 8, generator=g)
    return (q, kc, vc, torch.tensor([10, 1, 4], dtype=torch.int32),
            torch.tensor([2, 0, 3], dtype=torch.int32))  # fmt: skip


@pytest.mark.parametrize(
    ("op", "args"),
    [(flash_ops.varlen, varlen_args()), (flash_ops.kvcache, kvcache_args())],
    ids=["varlen", "kvcache"],
)
def test_opcheck(op: torch.library.CustomOpDef, args: tuple[object, ...]) -> None:
    torch.library.opcheck(op, args)


def test_the_reference_has_flash_attns_documented_semantics() -> None:
    q, k, v, cu_q, cu_k, mq, mk, window = varlen_args()
    got = flash_ops.varlen(q, k, v, cu_q, cu_k, mq, mk, window)  # type: ignore[arg-type]
    want = fake_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=True, window_size=(window - 1, 0))  # type: ignore[operator]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    q, kc, vc, lens, idx = kvcache_args()
    got = flash_ops.kvcache(q, kc, vc, lens, idx)  # type: ignore[arg-type]
    want = fake_kvcache(q[:, None], kc, vc, cache_seqlens=lens, cache_batch_idx=idx,  # type: ignore[index]
                        causal=True)[:, 0]  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_pass_through_the_ops_compiles_as_one_graph() -> None:
    model = make_model()
    eager = Engine(model, max_batch_size=2, score_batch_size=1, backend="sdpa")
    engine = Engine(model, max_batch_size=2, score_batch_size=1, backend="sdpa")
    backend = FlashBackend()
    engine.backend = backend
    run = torch.compile(model.run, backend="eager", fullgraph=True)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, ARGS.vocab_size, (W + 3,), generator=g).tolist()
    eager.passes.forward([0], [prompt], logits_rows=[])
    engine.passes.forward([0], [prompt], logits_rows=[])
    # A mixed pass (varlen for the chunk, kvcache for the decoder), then a decode pass.
    passes: list[tuple[list[int], list[Sequence[int]]]] = [
        ([0, 1], [[7], prompt[:5]]),
        ([0, 1], [[8], [9]]),
    ]
    for slots, chunks in passes:
        want = eager.passes.forward(slots, chunks, logits_rows=[0, 1])
        n = [len(c) for c in chunks]
        meta = engine.cache.plan(slots, n, tokens=[t for c in chunks for t in c],
                                 logits_rows=[0, 1])  # fmt: skip
        backend.prepare(meta, model.dtype)
        assert meta.tokens is not None
        with torch.no_grad():
            got = run(meta.tokens, meta, engine.cache, meta.logits_index, backend, False)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert isinstance(eager.backend, SdpaBackend)
