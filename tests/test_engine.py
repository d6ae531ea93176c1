"""The engine against its references: transformers' MistralForCausalLM on the same random
weights, and one full sliding-window forward for every cached / chunked / batched path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import Engine, GenerationRequest, ModelArgs, SamplingParams, ScoreRequest, load_model
from model.args import MISTRAL_7B
from model.attention import SdpaBackend
from model.cache import ForwardMetadata
from model.demo import random_weights
from model.errors import EngineError, RequestError
from model.transformer import Transformer
from model.weights import save_consolidated, save_hf

W = 16
ARGS = ModelArgs(
    dim=64,
    n_layers=2,
    head_dim=16,
    hidden_dim=160,
    n_heads=4,
    n_kv_heads=2,  # GQA: two query heads per key/value head
    norm_eps=1e-5,
    vocab_size=512,
    rope_theta=10000.0,
    sliding_window=W,
    max_seq_len=4096,
)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    state = random_weights(ARGS, seed=1)
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "consolidated": save_consolidated(root / "consolidated", ARGS, state),
        "hf": save_hf(root / "hf", ARGS, state),
    }


@pytest.fixture(scope="module")
def hf_model(folders: dict[str, Path]):  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    model = transformers.MistralForCausalLM.from_pretrained(
        folders["hf"], attn_implementation="sdpa", torch_dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def model(folders: dict[str, Path]) -> Transformer:
    return load_model(folders["consolidated"])


def full_logits(model: Transformer, tokens: list[int]) -> torch.Tensor:
    """The reference path: one forward over the whole sequence with the sliding-window mask."""
    meta = ForwardMetadata.fresh([len(tokens)], model.args.window, CPU)
    return model(torch.tensor(tokens), meta)


def random_tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, ARGS.vocab_size, (n,), generator=g).tolist()


@pytest.mark.parametrize("layout", ["consolidated", "hf"])
def test_logits_equal_transformers_from_both_layouts(
    folders: dict[str, Path],
    hf_model,
    layout: str,  # type: ignore[no-untyped-def]
) -> None:
    ours = load_model(folders[layout])
    seqs = [random_tokens(n, seed=n) for n in (3 * W + 5, 2 * W, 7)]  # >= 3 windows long
    # All three packed into one pass, no padding.
    meta = ForwardMetadata.fresh([len(s) for s in seqs], W, CPU)
    packed = ours(torch.tensor([t for s in seqs for t in s]), meta)
    offset = 0
    for s in seqs:
        with torch.no_grad():
            ref = hf_model(torch.tensor([s])).logits[0]
        torch.testing.assert_close(packed[offset : offset + len(s)], ref, atol=1e-4, rtol=1e-4)
        offset += len(s)


def test_window_matters_so_the_comparison_is_not_vacuous(model: Transformer) -> None:
    """Logits past the window differ from full causal attention: the mask really slides."""
    tokens = random_tokens(3 * W, seed=3)
    windowed = full_logits(model, tokens)
    meta = ForwardMetadata.fresh([len(tokens)], 10 * W, CPU)
    unwindowed = model(torch.tensor(tokens), meta)
    torch.testing.assert_close(windowed[:W], unwindowed[:W])
    assert (windowed[W:] - unwindowed[W:]).abs().max() > 1e-2


@pytest.mark.parametrize("padding", ["never", "always"])
@pytest.mark.parametrize("chunk_size", [1, 5, W, 2 * W + 3])
def test_chunked_prefill_and_rolling_decode_equal_full_forward(
    model: Transformer, chunk_size: int, padding: str
) -> None:
    engine = Engine(model, max_batch_size=3, score_batch_size=1, chunk_size=chunk_size)
    # Both ways of running a pre-fill pass: one SDPA call per sequence, or one padded batch.
    engine.backend = SdpaBackend(padding)
    lengths = [7 * W + 3, 4 * W + 1, 2 * W - 5]  # each wraps the W-row buffer several times
    seqs = [random_tokens(n, seed=10 + n) for n in lengths]
    prompt_lens = [n // 2 for n in lengths]
    got: list[list[torch.Tensor]] = [[] for _ in seqs]
    fed = [0] * len(seqs)
    slots = [0, 1, 2]
    # Every pass mixes sequences still pre-filling (a chunk each) with sequences decoding.
    while any(f < len(s) for f, s in zip(fed, seqs, strict=True)):
        batch = []
        for i, s in enumerate(seqs):
            if fed[i] < len(s):
                step = chunk_size if fed[i] < prompt_lens[i] else 1
                batch.append((i, s[fed[i] : fed[i] + step]))
        rows = list(range(sum(len(c) for _, c in batch)))
        logits = engine.passes.forward(
            [slots[i] for i, _ in batch], [c for _, c in batch], logits_rows=rows
        )
        offset = 0
        for i, chunk in batch:
            got[i].append(logits[offset : offset + len(chunk)])
            offset += len(chunk)
            fed[i] += len(chunk)
    for s, parts in zip(seqs, got, strict=True):
        torch.testing.assert_close(torch.cat(parts), full_logits(model, s), atol=1e-4, rtol=1e-4)


def test_rolling_buffer_holds_position_i_at_row_i_mod_w(model: Transformer) -> None:
    engine = Engine(model, max_batch_size=2, score_batch_size=1, chunk_size=5)
    tokens = random_tokens(3 * W + 7, seed=4)
    slot = 1
    engine.passes.forward([slot], [tokens], logits_rows=[])
    # Keys of layer 0 computed directly for every position.
    from model.transformer import apply_rope, rope_frequencies

    layer = model.layers[0]
    x = layer.attention_norm(model.tok_embeddings(torch.tensor(tokens)))
    q_rows, kv_rows = ARGS.n_heads * ARGS.head_dim, ARGS.n_kv_heads * ARGS.head_dim
    wk = layer.attention.wqkv.weight[q_rows : q_rows + kv_rows]  # wk's rows of the fused q/k/v
    k = torch.nn.functional.linear(x, wk).view(len(tokens), ARGS.n_kv_heads, ARGS.head_dim)
    k = apply_rope(k, rope_frequencies(torch.arange(len(tokens)), ARGS.head_dim, ARGS.rope_theta))
    cache = engine.cache
    for pos in range(len(tokens) - W, len(tokens)):
        torch.testing.assert_close(cache.k[0, slot * W + pos % W], k[pos], atol=1e-5, rtol=1e-5)


def test_cache_memory_is_bounded_by_the_window_for_the_7b_shape() -> None:
    seven_b = MISTRAL_7B
    from model.cache import RollingCache

    rolling = RollingCache.for_model(seven_b, 1, device="meta", dtype=torch.bfloat16)
    full_args = ModelArgs(**{**seven_b.to_params(), "sliding_window": None})
    full = RollingCache.for_model(full_args, 1, device="meta", dtype=torch.bfloat16)
    # Measured from the allocated tensors: the paper's 8x at 32k tokens with W = 4096.
    assert rolling.nbytes == 2 * 32 * 4096 * 8 * 128 * 2
    assert full.nbytes == 2 * 32 * 32768 * 8 * 128 * 2
    assert full.nbytes == 8 * rolling.nbytes


def test_cache_does_not_grow_with_sequence_length(model: Transformer) -> None:
    engine = Engine(model, max_batch_size=1, score_batch_size=1)
    before = [(t.data_ptr(), t.nbytes) for t in (engine.cache.k, engine.cache.v)]
    engine.generate([random_tokens(5 * W, seed=5)], 10 * W, stop_tokens=frozenset())
    after = [(t.data_ptr(), t.nbytes) for t in (engine.cache.k, engine.cache.v)]
    assert before == after


def test_greedy_generate_equals_transformers_past_the_window(
    model: Transformer,
    hf_model,  # type: ignore[no-untyped-def]
) -> None:
    engine = Engine(model, max_batch_size=3, score_batch_size=1, chunk_size=W // 2)
    prompts = [random_tokens(n, seed=20 + n) for n in (W + 3, 5, 2 * W)]
    new = 3 * W
    ours = engine.generate(prompts, new, stop_tokens=frozenset())
    for prompt, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            ref = hf_model.generate(
                torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                eos_token_id=None, pad_token_id=0,
            )[0, len(prompt):].tolist()  # fmt: skip
        assert got == ref


def test_generate_stops_at_eos_and_counts_the_budget(model: Transformer) -> None:
    engine = Engine(model, max_batch_size=2, score_batch_size=1)
    prompt = random_tokens(9, seed=6)
    free = engine.generate([prompt], 12, stop_tokens=frozenset())[0]
    assert len(free) == 12
    stop = free[4]
    stopped = engine.generate([prompt], 12, stop_tokens=frozenset({stop}))[0]
    assert stopped == free[: free.index(stop) + 1]


@pytest.mark.parametrize("block_rows", [1, 4096])
def test_score_equals_log_probabilities_of_one_full_forward(
    model: Transformer, block_rows: int
) -> None:
    engine = Engine(model, max_batch_size=1, score_batch_size=4, chunk_size=7)
    engine.scoring.logit_block_rows = (
        block_rows  # full logits one row at a time, or all in one block
    )
    prompt = random_tokens(3 * W + 2, seed=7)
    # Shared prefixes, different lengths, a single-token continuation.
    conts = [[5, 6, 7], [5, 6, 8], [9], [5, 10, 11, 12], [5, 6]]
    scores = engine.score(prompt, conts)
    for cont, got in zip(conts, scores, strict=True):
        logp = torch.log_softmax(full_logits(model, prompt + cont), dim=-1)
        want = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(cont))
        assert got == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("padding", ["never", "always", "auto"])
def test_prefix_reuse_and_batching_equal_plain_scoring(model: Transformer, padding: str) -> None:
    engine = Engine(model, max_batch_size=1, score_batch_size=2, chunk_size=W)
    engine.backend = SdpaBackend(padding)
    shared = random_tokens(2 * W + 3, seed=8)
    prefix = engine.prefill_prefix(shared)
    conts = [[3, 4], [3, 5, 6], [7, 8]]  # branches: siblings must not see each other
    bodies = [random_tokens(n, seed=30 + n) for n in (4, W + 1, 1)]
    # Five requests over a score batch of two: groups, prefix and plain requests mixed.
    requests = [ScoreRequest(b, conts, prefix) for b in bodies] + [
        ScoreRequest(shared + b, conts) for b in bodies[:2]
    ]
    batched = engine.score_batch(requests)
    for b, got in zip(bodies + bodies[:2], batched, strict=True):
        alone = engine.score(shared + b, conts)
        assert got == pytest.approx(alone, abs=1e-5)


def test_relative_scores_are_log_probabilities_shifted_by_one_constant_per_request(
    model: Transformer,
) -> None:
    engine = Engine(model, max_batch_size=1, score_batch_size=3, chunk_size=W)
    conts = [[5, 6, 7], [5, 6, 8], [9], [5, 10]]
    requests = [ScoreRequest(random_tokens(n, seed=40 + n), conts) for n in (3, W + 2, 2 * W)]
    absolute = engine.score_batch(requests)
    relative = engine.score_batch(requests, relative=True)
    shifts = []
    for a, r in zip(absolute, relative, strict=True):
        shift = [ri - ai for ai, ri in zip(a, r, strict=True)]
        assert shift == pytest.approx([shift[0]] * len(conts), abs=1e-4)
        # The constant is the root's log-normaliser, not zero: relative scores skipped it.
        assert abs(shift[0]) > 1.0
        shifts.append(shift[0])
        # So a softmax over the continuations is the same either way.
        torch.testing.assert_close(
            torch.softmax(torch.tensor(r), 0), torch.softmax(torch.tensor(a), 0), atol=1e-5, rtol=0
        )
    assert len({round(x, 3) for x in shifts}) == len(shifts)  # one constant per request


def test_requests_joining_mid_generation_get_the_same_tokens(model: Transformer) -> None:
    engine = Engine(model, max_batch_size=3, score_batch_size=1, chunk_size=6)
    a, b, c = (random_tokens(n, seed=40 + n) for n in (W + 2, 3, 2 * W + 1))
    solo = [engine.generate([p], 2 * W, stop_tokens=frozenset())[0] for p in (a, b, c)]
    ids = [engine.add_request(GenerationRequest(a, 2 * W, stop_tokens=frozenset()))]
    out: dict[int, list[int]] = {ids[0]: []}
    for step in range(200):
        if step == 5:
            ids.append(engine.add_request(GenerationRequest(b, 2 * W, stop_tokens=frozenset())))
        if step == 11:
            ids.append(engine.add_request(GenerationRequest(c, 2 * W, stop_tokens=frozenset())))
        for ev in engine.step():
            out.setdefault(ev.request_id, []).append(ev.token)
        if step > 11 and not engine.has_unfinished():
            break
    assert [out[i] for i in ids] == solo


def test_cancelled_request_frees_its_slot(model: Transformer) -> None:
    engine = Engine(model, max_batch_size=1, score_batch_size=1)
    first = engine.add_request(GenerationRequest(random_tokens(5, 1), 100))
    second = engine.add_request(GenerationRequest(random_tokens(5, 2), 3))
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1
    assert engine.cancel(first)
    events = []
    while engine.has_unfinished():
        events += engine.step()
    assert {e.request_id for e in events} == {second}
    assert not engine.cancel(first)


def test_sampling_is_reproducible_with_a_seed(model: Transformer) -> None:
    engine = Engine(model, max_batch_size=2, score_batch_size=1)
    prompt = random_tokens(8, seed=9)
    one = engine.generate([prompt], 20, temperature=1.0, seed=123, stop_tokens=frozenset())
    two = engine.generate([prompt], 20, temperature=1.0, seed=123, stop_tokens=frozenset())
    other = engine.generate([prompt], 20, temperature=1.0, seed=7, stop_tokens=frozenset())
    greedy = engine.generate([prompt], 20, stop_tokens=frozenset())
    nucleus = engine.generate(
        [prompt], 20, temperature=1.0, top_p=1e-6, seed=1, stop_tokens=frozenset()
    )
    assert one == two
    assert one != other
    assert nucleus == greedy  # top_p -> 0 keeps only the most probable token


@pytest.mark.parametrize(
    ("params", "match"),
    [({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p")],
)
def test_bad_sampling_parameters_are_refused(params: dict[str, float], match: str) -> None:
    with pytest.raises(RequestError, match=match):
        SamplingParams(**params)


def test_bad_requests_get_clear_errors(model: Transformer) -> None:
    engine = Engine(model, max_batch_size=1, score_batch_size=1)
    with pytest.raises(RequestError, match="prompt is empty"):
        engine.add_request(GenerationRequest([], 5))
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.add_request(GenerationRequest([ARGS.vocab_size], 5))
    with pytest.raises(RequestError, match="max_new_tokens"):
        engine.add_request(GenerationRequest([5], 0))
    with pytest.raises(RequestError, match="continuations"):
        engine.score([5, 6], [[]])
    with pytest.raises(RequestError, match="prompt is empty"):
        engine.score([], [[1]])


def test_without_a_sliding_window_the_context_is_a_hard_limit() -> None:
    args = ModelArgs(**{**ARGS.to_params(), "sliding_window": None, "max_seq_len": 64})
    with torch.device("meta"):
        m = Transformer(args)
    m.load_state_dict(random_weights(args), assign=True)
    engine = Engine(m, max_batch_size=1, score_batch_size=1)
    assert engine.window == 64 and engine.max_context == 64
    with pytest.raises(RequestError, match="exceed the context of 64"):
        engine.add_request(GenerationRequest(list(range(3, 60)), 10))
    assert len(engine.generate([list(range(3, 50))], 10, stop_tokens=frozenset())[0]) == 10


def test_backend_selection() -> None:
    from model.attention import SdpaBackend, select_backend

    assert isinstance(select_backend("auto", CPU, torch.float32), SdpaBackend)
    with pytest.raises(EngineError, match="needs CUDA"):
        select_backend("flash", CPU, torch.bfloat16)
    with pytest.raises(EngineError, match="unknown attention backend"):
        select_backend("xformers", CPU)


def test_a_step_token_budget_bounds_every_pass_without_changing_results(
    model: Transformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine(model, max_batch_size=3, score_batch_size=3, chunk_size=5, max_step_tokens=7)
    sizes: list[int] = []
    real = engine.passes.forward

    def spy(slots, chunks, **kw):  # type: ignore[no-untyped-def]
        sizes.append(sum(len(c) for c in chunks))
        return real(slots, chunks, **kw)

    monkeypatch.setattr(engine.passes, "forward", spy)
    prompts = [random_tokens(n, seed=50 + n) for n in (3 * W, 2 * W + 1, 9)]
    got = engine.generate(prompts, 6, stop_tokens=frozenset())
    assert max(sizes) <= 7
    sizes.clear()
    scores = engine.score_batch([ScoreRequest(p, [[3, 4], [5]]) for p in prompts])
    assert max(sizes[:-1]) <= 7  # pre-fill passes; the last is the label tree pass
    free = Engine(model, max_batch_size=3, score_batch_size=3)
    assert got == free.generate(prompts, 6, stop_tokens=frozenset())
    reference = free.score_batch([ScoreRequest(p, [[3, 4], [5]]) for p in prompts])
    for a, b in zip(scores, reference, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
