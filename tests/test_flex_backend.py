"""The FlexAttention backend against the SDPA backend on CPU, fp32: logits of every kind of
pass (pre-fill past the window in chunks, mixed steps, label trees over a wrapped window,
prefix reuse), greedy tokens and label scores; eagerly, inside a `fullgraph` compiled step, and
with the generated kernel (torch.compile of flex_attention)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from model import Engine, ModelArgs, ScoreRequest
from model.attention import SdpaBackend, flex_backend, select_backend
from model.demo import random_weights
from model.flex import BLOCK, FlexBackend, FlexPass
from model.transformer import Transformer

W = 16
ARGS = ModelArgs(
    dim=64, n_layers=2, head_dim=16, hidden_dim=160, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
    vocab_size=512, sliding_window=W, max_seq_len=4096,
)  # fmt: skip
CONTS = [[4, 5], [4, 6, 7], [8], [9, 10, 11, 12]]


@pytest.fixture(scope="module")
def model() -> Transformer:
    with torch.device("meta"):
        m = Transformer(ARGS)
    m.load_state_dict(random_weights(ARGS, seed=5), assign=True)
    return m.eval()


def tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, ARGS.vocab_size, (n,), generator=g).tolist()


def engines(model: Transformer, flex: FlexBackend) -> tuple[Engine, Engine]:
    sdpa = Engine(model, max_batch_size=3, score_batch_size=3, chunk_size=7, backend="sdpa")
    other = Engine(model, max_batch_size=3, score_batch_size=3, chunk_size=7, backend="sdpa")
    other.backend = flex
    return sdpa, other


def passes() -> list[tuple[list[int], list[Sequence[int]], list[int]]]:
    """(slots, chunks, logits rows) of a pass sequence covering every kind of pass."""
    return [
        # Fresh sequences, one longer than the window.
        ([0, 1], [tokens(7, 1), tokens(W + 9, 2)], list(range(W + 16))),
        # A chunk that wraps slot 0's buffer, slot 1 decoding: a mixed step.
        ([0, 1], [tokens(12, 3), [7]], list(range(13))),
        # Two decoders and a fresh chunk in the third slot.
        ([2, 0, 1], [tokens(5, 4), [9], [11]], list(range(7))),
        # Decoders only.
        ([0, 1, 2], [[5], [6], [8]], [0, 1, 2]),
    ]


@pytest.mark.parametrize("flex_decode", [False, True], ids=["sdpa-decode", "flex-decode"])
def test_every_kind_of_pass_gives_the_sdpa_logits(model: Transformer, flex_decode: bool) -> None:
    sdpa, flex = engines(model, flex_backend(torch.device("cpu"), flex_decode=flex_decode))
    for slots, chunks, rows in passes():
        want = sdpa.passes.forward(slots, chunks, logits_rows=rows)
        got = flex.passes.forward(slots, chunks, logits_rows=rows)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_greedy_tokens_and_label_scores_match_sdpa_with_a_wrapping_window(
    model: Transformer,
) -> None:
    sdpa, flex = engines(model, flex_backend(torch.device("cpu")))
    prompts = [tokens(3 * W + 1, 10), tokens(5, 11), tokens(2 * W, 12)]
    # Chunked pre-fill past the window, then decode past it: the buffers wrap.
    want = sdpa.generate(prompts, W + 4, stop_tokens=frozenset())
    assert flex.generate(prompts, W + 4, stop_tokens=frozenset()) == want
    # Label trees over wrapped windows, with and without a reused prefix (longer than W).
    prefix_tokens = tokens(W + 5, 13)
    requests = [ScoreRequest(tokens(n, 20 + n), CONTS) for n in (1, W - 1, 2 * W + 3)]
    with_prefix = [
        ScoreRequest(r.prompt, r.continuations, sdpa.prefill_prefix(prefix_tokens))
        for r in requests
    ]
    flex_prefix = flex.prefill_prefix(prefix_tokens)
    flex_with_prefix = [ScoreRequest(r.prompt, r.continuations, flex_prefix) for r in requests]
    for a, b in ((requests, requests), (with_prefix, flex_with_prefix)):
        want_scores = sdpa.score_batch(a)
        got_scores = flex.score_batch(b)
        for w, g in zip(want_scores, got_scores, strict=True):
            assert g == pytest.approx(w, abs=1e-4)


def test_the_block_mask_is_built_once_per_pass_and_shared_by_the_layers(
    model: Transformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import model.flex as flex_module

    built = 0
    real = flex_module.create_block_mask

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal built
        built += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(flex_module, "create_block_mask", counting)
    _, flex = engines(model, flex_backend(torch.device("cpu")))
    flex.score(tokens(W + 3, 30), CONTS)  # pre-fill chunks + one tree pass, 2 layers each
    assert built == flex.stats.forward_passes
    assert ARGS.n_layers > 1


def test_flex_holds_in_a_fullgraph_compiled_pass(model: Transformer) -> None:
    backend = flex_backend(torch.device("cpu"))
    sdpa, flex = engines(model, backend)
    slots, chunks, rows = passes()[0]
    sdpa.passes.forward(slots, chunks, logits_rows=rows)
    flex.passes.forward(slots, chunks, logits_rows=rows)
    # A mixed step with a tree-free chunk, traced whole by dynamo (no graph break).
    meta_args = ([0, 1], [len(tokens(12, 3)), 1])
    want = sdpa.passes.forward(meta_args[0], [tokens(12, 3), [7]], logits_rows=list(range(13)))
    meta = flex.cache.plan(*meta_args, tokens=[*tokens(12, 3), 7], logits_rows=list(range(13)))
    backend.prepare(meta, model.dtype)
    assert meta.tokens is not None
    run = torch.compile(model.run, backend="eager", fullgraph=True)
    with torch.no_grad():
        got = run(meta.tokens, meta, flex.cache, meta.logits_index, backend, False)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_the_compiled_kernel_gives_the_sdpa_scores(model: Transformer) -> None:
    """torch.compile(flex_attention) on CPU: the generated kernel, padded to whole blocks."""
    backend = flex_backend(torch.device("cpu"), compile_kernel=True)
    sdpa, flex = engines(model, backend)
    seen: list[FlexPass] = []
    real = backend.prepare

    def spy(meta, dtype):  # type: ignore[no-untyped-def]
        real(meta, dtype)
        if meta.flex is not None:
            seen.append(meta.flex)

    backend.prepare = spy  # type: ignore[method-assign]
    prompt = tokens(W + 4, 40)  # past the window: the tree reads a wrapped buffer
    assert flex.score(prompt, CONTS) == pytest.approx(sdpa.score(prompt, CONTS), abs=1e-4)
    assert seen and all(p.q_len % BLOCK == 0 and p.k_len % BLOCK == 0 for p in seen)


def test_auto_keeps_sdpa_on_cpu_and_flex_is_chosen_by_name() -> None:
    cpu = torch.device("cpu")
    assert isinstance(select_backend("auto", cpu, torch.float32), SdpaBackend)
    flex = select_backend("flex", cpu, torch.float32)
    assert isinstance(flex, FlexBackend) and not flex.compile_kernel
    cuda = select_backend("flex", torch.device("cuda"), torch.bfloat16)
    assert isinstance(cuda, FlexBackend) and cuda.compile_kernel


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cuda_kernel_gives_the_sdpa_logits_and_scores() -> None:
    with torch.device("meta"):
        m = Transformer(ARGS)
    m.load_state_dict(random_weights(ARGS, seed=5), assign=True)
    m = m.to("cuda").eval()
    sdpa = Engine(m, max_batch_size=3, score_batch_size=3, chunk_size=7, backend="sdpa",
                  compile=False)  # fmt: skip
    flex = Engine(m, max_batch_size=3, score_batch_size=3, chunk_size=7, backend="flex")
    assert isinstance(flex.backend, FlexBackend) and flex.backend.compile_kernel
    assert flex.prefill_compile_seconds > 0  # compiled before serving
    for slots, chunks, rows in passes()[:3]:
        want = sdpa.passes.forward(slots, chunks, logits_rows=rows)
        got = flex.passes.forward(slots, chunks, logits_rows=rows)
        torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    prompt = tokens(2 * W + 3, 50)
    assert flex.score(prompt, CONTS) == pytest.approx(sdpa.score(prompt, CONTS), abs=1e-3)
