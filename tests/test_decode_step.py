"""What a decode step costs: attention over what is cached, one host sync, one transfer.

A GPU step that synchronises cannot run ahead of the device nor be captured; this machine has
no GPU, so `bench.step_counts.StepCounter` also flags what would synchronise on CUDA.
"""

from __future__ import annotations

import logging

import pytest
import torch

from bench.step_counts import StepCounter
from model import Engine, GenerationRequest, ModelArgs, SamplingError, SamplingParams, TokenEvent
from model.cache import ForwardMetadata
from model.cpu_gemm import pack_for_cpu
from model.demo import random_weights
from model.transformer import Transformer

W = 16
ARGS = ModelArgs(
    dim=64, n_layers=2, head_dim=16, hidden_dim=160, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
    vocab_size=512, sliding_window=W, max_seq_len=4096,
)  # fmt: skip


@pytest.fixture(scope="module")
def model() -> Transformer:
    with torch.device("meta"):
        m = Transformer(ARGS)
    m.load_state_dict(random_weights(ARGS, seed=11), assign=True)
    return m.eval()


def random_tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, ARGS.vocab_size, (n,), generator=g).tolist()


def full_logits(model: Transformer, tokens: list[int]) -> torch.Tensor:
    return model(torch.tensor(tokens), ForwardMetadata.fresh([len(tokens)], W, torch.device("cpu")))


def test_a_decode_step_synchronises_once_and_copies_its_indices_once(model: Transformer) -> None:
    engine = Engine(model, max_batch_size=3, score_batch_size=1)
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.8, seed=1),
        SamplingParams(temperature=1.0, top_p=0.9, seed=2),
    ]
    for i, p in enumerate(params):
        engine.add_request(GenerationRequest(random_tokens(5 + i, i), 20, p, frozenset()))
    engine.step()  # pre-fill
    engine.step()
    with StepCounter() as counts:
        events = engine.step()
    assert len(events) == 3
    # The one sync: reading the sampled tokens. The one transfer: the step's indices.
    assert counts.syncs == 1, dict(counts.sync_reasons)
    assert counts.sync_reasons == {"tolist": 1}
    assert counts.transfers == 1
    assert counts.ops > 0


def test_the_counter_sees_what_would_synchronise_on_cuda() -> None:
    x = torch.arange(6.0)
    with StepCounter() as counts:
        x.sum().item()
        torch.nonzero(x > 2)
        torch.tensor([1, 2], device="cpu")
        x.tolist()
        x[x > 2]
    assert counts.syncs == 5, dict(counts.sync_reasons)


def test_decode_attends_only_to_the_filled_rows_of_each_slot(model: Transformer) -> None:
    engine = Engine(model, max_batch_size=2, score_batch_size=1)
    # Stale rows from an earlier occupant must not leak into a younger sequence's attention.
    engine.cache.k.fill_(30.0)
    engine.cache.v.fill_(-30.0)
    spans: list[int] = []
    real_plan = engine.cache.plan

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        meta = real_plan(*args, **kwargs)
        if meta.decoding is not None:
            spans.append(meta.decoding.span)
        return meta

    engine.cache.plan = spy  # type: ignore[method-assign]
    prompts = [random_tokens(3, 1), random_tokens(6, 2)]
    got = engine.generate(prompts, W + 4, stop_tokens=frozenset())
    # Exactly the longest sequence's rows on CPU, until the buffers wrap (then the window).
    assert spans[0] == 7 and spans[1] == 8
    assert max(spans) == W
    for p, new in zip(prompts, got, strict=True):
        logits = full_logits(model, p + new[:-1])
        assert logits[len(p) - 1 :].argmax(-1).tolist() == new


def test_bucketed_spans_give_the_same_tokens(model: Transformer) -> None:
    exact = Engine(model, max_batch_size=2, score_batch_size=1)
    bucketed = Engine(model, max_batch_size=2, score_batch_size=1)
    bucketed.cache.bucket_spans = True  # what CUDA and compiled steps use
    prompts = [random_tokens(3, 3), random_tokens(9, 4)]
    assert bucketed.generate(prompts, 2 * W, stop_tokens=frozenset()) == exact.generate(
        prompts, 2 * W, stop_tokens=frozenset()
    )


def test_a_mixed_step_gathers_only_the_pre_filling_windows(model: Transformer) -> None:
    engine = Engine(model, max_batch_size=3, score_batch_size=1)
    cache = engine.cache
    for slot, n in ((0, 10), (1, 40)):
        engine.passes.forward([slot], [random_tokens(n, slot)], logits_rows=[])
    # Slot 2 pre-fills a chunk between two decoders; the decoders are packed first.
    meta = cache.plan([0, 2, 1], [1, 5, 1], tokens=[7, 1, 2, 3, 4, 5, 8], logits_rows=[0, 5, 6])
    assert meta.decoding is not None and meta.decoding.count == 2
    assert meta.seqlens == [5] and meta.cached_lens == [0]
    assert meta.gather_rows.numel() == 0  # nothing of the decoders' windows is copied
    assert meta.tokens is not None and meta.tokens.tolist() == [7, 8, 1, 2, 3, 4, 5]
    assert meta.logits_index is not None and meta.logits_index.tolist() == [0, 6, 1]


def test_a_seed_gives_the_same_tokens_alone_or_batched(model: Transformer) -> None:
    engine = Engine(model, max_batch_size=3, score_batch_size=1)
    prompt = random_tokens(7, 5)
    alone = engine.generate([prompt], 12, temperature=0.9, top_p=0.95, seed=42,
                            stop_tokens=frozenset())[0]  # fmt: skip
    ids = [
        engine.add_request(GenerationRequest(random_tokens(4, 6), 12, stop_tokens=frozenset())),
        engine.add_request(
            GenerationRequest(
                prompt, 12, SamplingParams(temperature=0.9, top_p=0.95, seed=42), frozenset()
            )
        ),
        engine.add_request(
            GenerationRequest(
                random_tokens(9, 7), 12, SamplingParams(temperature=1.3, seed=1), frozenset()
            )
        ),
    ]
    out: dict[int, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for ev in engine.step():
            out[ev.request_id].append(ev.token)
    assert out[ids[1]] == alone


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_token_tree_passes_avoid_the_math_kernel_on_cuda() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.device("meta"):
        m = Transformer(ARGS)
    m.load_state_dict(random_weights(ARGS, seed=11), assign=True)
    m = m.to("cuda", torch.bfloat16).eval()
    gpu = Engine(m, max_batch_size=1, score_batch_size=2, backend="sdpa", compile=False)
    conts = [[4, 5], [4, 6, 7], [8]]
    want = gpu.score(random_tokens(2 * W + 1, 8), conts)
    # Forbid the math kernel: tree passes must run on the efficient (or flash) one.
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        got = gpu.score(random_tokens(2 * W + 1, 8), conts)
    assert got == pytest.approx(want, abs=1e-3)


def test_compile_declines_on_cpu_with_a_warning(
    model: Transformer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="model.engine"):
        engine = Engine(model, max_batch_size=2, score_batch_size=1, compile=True)
    assert not engine.compile and engine.passes.decode_step is None
    assert any("compile: ignored on CPU" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("packed", [None, True, False])
def test_a_compiled_decode_step_gives_the_eager_tokens(
    model: Transformer, packed: bool | None
) -> None:
    """Whatever pack_for_cpu chose for this host (None), and both choices forced: a traced
    step once took oneDNN-packed matrices for plain ones."""
    if packed is not None:
        model = Transformer(ARGS)
        model.load_state_dict(random_weights(ARGS, seed=11))
        model.eval()
        assert pack_for_cpu(model, packed=packed)
    eager = Engine(model, max_batch_size=2, score_batch_size=1)
    # Forced: on CPU compile=True alone declines (slower than eager there).
    compiled = Engine(
        model, max_batch_size=2, score_batch_size=1, compile=True, compile_on_cpu=True
    )
    assert compiled.passes.decode_step is not None
    prompts = [random_tokens(3, 12), random_tokens(W + 2, 13)]
    # Past the window, so the spans go through several buckets and the buffers wrap.
    want = eager.generate(prompts, W + 3, stop_tokens=frozenset())
    assert compiled.generate(prompts, W + 3, stop_tokens=frozenset()) == want
    # A lone sequence after a batch of two: another batch size, same tokens.
    assert compiled.generate(prompts[:1], 4, stop_tokens=frozenset())[0] == want[0][:4]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_graph_decode_step_gives_the_eager_tokens_with_one_sync() -> None:
    with torch.device("meta"):
        m = Transformer(ARGS)
    m.load_state_dict(random_weights(ARGS, seed=11), assign=True)
    m = m.to("cuda").eval()
    eager = Engine(m, max_batch_size=2, score_batch_size=1, backend="sdpa", compile=False)
    compiled = Engine(m, max_batch_size=2, score_batch_size=1, backend="sdpa", compile=True)
    prompts = [random_tokens(3, 12), random_tokens(W + 2, 13)]
    want = eager.generate(prompts, W + 3, stop_tokens=frozenset())
    assert compiled.generate(prompts, W + 3, stop_tokens=frozenset()) == want
    for p in prompts:
        compiled.add_request(GenerationRequest(p, 8, stop_tokens=frozenset()))
    compiled.step()
    compiled.step()
    with StepCounter() as counts:
        compiled.step()
    assert counts.syncs == 1, dict(counts.sync_reasons)


# ------------------------------------------------------ one sequence's sampling fails


def run_all(engine: Engine, requests: list[GenerationRequest]) -> dict[int, list[TokenEvent]]:
    ids = [engine.add_request(r) for r in requests]
    events: dict[int, list[TokenEvent]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for ev in engine.step():
            events[ev.request_id].append(ev)
    return {n: events[i] for n, i in enumerate(ids)}


def tokens_of(events: list[TokenEvent]) -> list[int]:
    return [ev.token for ev in events if ev.error is None]


def test_non_finite_logits_end_only_their_sequence(
    model: Transformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=5)
    requests = [
        GenerationRequest(random_tokens(5, 31), 9, stop_tokens=frozenset()),
        GenerationRequest(random_tokens(7, 32), 9, stop_tokens=frozenset()),
        GenerationRequest(random_tokens(W + 3, 33), 9, seeded, stop_tokens=frozenset()),
    ]
    alone = run_all(Engine(model, max_batch_size=3, score_batch_size=1),
                    [requests[0], requests[2]])  # fmt: skip
    engine = Engine(model, max_batch_size=3, score_batch_size=1)
    real_forward = engine.passes.forward
    steps = 0

    def forward(*args: object, **kwargs: object) -> torch.Tensor:
        nonlocal steps
        logits = real_forward(*args, **kwargs)  # type: ignore[arg-type]
        steps += 1
        if steps == 4:  # a decode step of all three: the second one's row goes NaN
            logits = logits.clone()
            logits[1, 17] = float("nan")
        return logits

    monkeypatch.setattr(engine.passes, "forward", forward)
    got = run_all(engine, requests)
    failed = got[1][-1]
    assert failed.finished and failed.finish_reason == "error"
    assert failed.error is not None and "not finite" in failed.error
    assert len(tokens_of(got[1])) == 3  # the three tokens before the failing step
    assert all(ev.error is None for ev in got[1][:-1])
    # The others ran to their end with the tokens they get without the failing sequence.
    assert tokens_of(got[0]) == tokens_of(alone[0]) and len(tokens_of(got[0])) == 9
    assert tokens_of(got[2]) == tokens_of(alone[1]) and len(tokens_of(got[2])) == 9
    # Its slot was freed: the engine serves new work.
    assert engine.num_running == 0
    assert engine.generate([random_tokens(4, 34)], 3, stop_tokens=frozenset())[0]


def test_a_temperature_that_overflows_the_logits_fails_its_sequence_only(
    model: Transformer,
) -> None:
    requests = [
        GenerationRequest(random_tokens(5, 41), 6, stop_tokens=frozenset()),
        GenerationRequest(random_tokens(6, 42), 6, SamplingParams(temperature=1e-45, seed=1),
                          stop_tokens=frozenset()),
    ]  # fmt: skip
    alone = run_all(Engine(model, max_batch_size=2, score_batch_size=1), requests[:1])
    got = run_all(Engine(model, max_batch_size=2, score_batch_size=1), requests)
    assert [ev.finish_reason for ev in got[1]] == ["error"]
    assert tokens_of(got[0]) == tokens_of(alone[0]) and len(tokens_of(got[0])) == 6


def test_a_sampler_that_raises_fails_only_the_rows_that_raise(
    model: Transformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import model.generation as engine_module

    real = engine_module.sample_batch

    def sample_batch(logits, params, gens):  # type: ignore[no-untyped-def]
        if any(p.seed == 666 for p in params):
            raise RuntimeError("sampler exploded")
        return real(logits, params, gens)

    monkeypatch.setattr(engine_module, "sample_batch", sample_batch)
    doomed = SamplingParams(temperature=0.7, seed=666)
    requests = [
        GenerationRequest(random_tokens(5, 51), 5, stop_tokens=frozenset()),
        GenerationRequest(random_tokens(6, 52), 5, doomed, stop_tokens=frozenset()),
        GenerationRequest(random_tokens(4, 53), 5, stop_tokens=frozenset()),
    ]
    alone = run_all(Engine(model, max_batch_size=3, score_batch_size=1),
                    [requests[0], requests[2]])  # fmt: skip
    engine = Engine(model, max_batch_size=3, score_batch_size=1)
    got = run_all(engine, requests)
    assert len(got[1]) == 1 and got[1][0].finish_reason == "error"
    assert got[1][0].error is not None and "sampler exploded" in got[1][0].error
    assert tokens_of(got[0]) == tokens_of(alone[0])
    assert tokens_of(got[2]) == tokens_of(alone[1])
    # generate() has no place for an error in its lists of tokens: it raises, naming it.
    with pytest.raises(SamplingError, match=r"2 of 2 sequences failed: .*sampler exploded"):
        engine.generate([random_tokens(5, 51), random_tokens(6, 52)], 3, seed=666, temperature=0.5)
