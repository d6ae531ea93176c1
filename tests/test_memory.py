"""Memory planning: slots sized from a budget and a context limit, at the real 7B shapes
(meta tensors, nothing allocated), and the engine that starts from the plan."""

from __future__ import annotations

import gc
import logging
import weakref

import pytest
import torch

from model import Engine, GenerationRequest, ModelArgs
from model.args import MISTRAL_7B
from model.demo import random_weights
from model.errors import MemoryBudgetError, RequestError
from model.memory import (
    GiB,
    MemoryPlan,
    activation_bytes,
    cache_rows,
    cuda_budget,
    default_cpu_cache_bytes,
    engine_activation_bytes,
    kv_bytes_per_token,
    plan_engine_memory,
    plan_memory,
    weights_bytes,
)
from model.transformer import Transformer

V01 = MISTRAL_7B  # window 4096
V02 = ModelArgs(**{**MISTRAL_7B.to_params(), "sliding_window": None, "rope_theta": 1e6})
BF16 = torch.bfloat16
KIB = 1024
# The service's default request: 32 generation + 32 scoring slots, an 8192-token context.
ASKED = {"max_batch_size": 32, "score_batch_size": 32}


def seven_b_weights() -> int:
    with torch.device("meta"):
        model = Transformer(MISTRAL_7B).to(BF16)
    return weights_bytes(model)


def card_budget(total: int, weights: int) -> int:
    """A card that holds the weights and a 0.5 GiB CUDA context, at vLLM's default 0.9."""
    return cuda_budget(total=total, free=total - weights - GiB // 2, weights=weights,
                       utilization=0.9)  # fmt: skip


def seven_b_activations(args: ModelArgs, context: int, *, flash: bool) -> int:
    rows = cache_rows(args, context)[0]
    return activation_bytes(
        args, BF16, step_tokens=4096, chunk_tokens=min(rows, 4096), rows=rows, sequences=32,
        logits_rows=32 + 32 * 32, materialised_scores=not flash,
    )  # fmt: skip


def test_seven_b_costs_128_kib_per_token_and_14_5_gb_of_weights() -> None:
    assert kv_bytes_per_token(MISTRAL_7B, BF16) == 128 * KIB
    # 7,241,732,096 parameters in bf16.
    assert seven_b_weights() == 14_483_464_192


def test_rows_are_the_window_or_the_context_limit() -> None:
    assert cache_rows(V01, None) == (4096, True, None)
    assert cache_rows(V01, 8192) == (4096, True, 8192)  # the window; 8192 bounds requests
    assert cache_rows(V01, 2048) == (2048, False, 2048)  # no request reaches the window
    assert cache_rows(V02, None) == (32768, False, 32768)
    assert cache_rows(V02, 8192) == (8192, False, 8192)
    assert cache_rows(V02, 100_000) == (32768, False, 32768)  # never past the model's maximum


@pytest.mark.parametrize(
    ("args", "total", "flash", "slots"),
    [
        # 80 GB: 72 GB budget - 0.54 GB context - 14.48 GB weights - activations: all 64 fit.
        (V01, 80 * 10**9, True, (32, 32)),
        (V01, 80 * 10**9, False, (32, 32)),
        (V02, 80 * 10**9, True, (24, 25)),  # 49 slots of 1 GiB (8192 x 128 KiB)
        (V02, 80 * 10**9, False, (18, 19)),  # SDPA's fp32 scores: 12 GiB more activations
        # 40 GB: 36 GB budget: (36e9 - 0.54e9 - 14.48e9 - 2.44e9) // 512 MiB = 34 slots.
        (V01, 40 * 10**9, True, (17, 17)),
        (V01, 40 * 10**9, False, (9, 9)),
        (V02, 40 * 10**9, True, (8, 8)),
        (V02, 40 * 10**9, False, (2, 2)),
    ],
)
def test_seven_b_fits_80_and_40_gb_cards_with_an_8192_context(
    args: ModelArgs, total: int, flash: bool, slots: tuple[int, int]
) -> None:
    weights = seven_b_weights()
    budget = card_budget(total, weights)
    act = seven_b_activations(args, 8192, flash=flash)
    plan = plan_memory(args, BF16, max_context=8192, budget_bytes=budget, weights_bytes=weights,
                       activation_bytes=act, **ASKED)  # fmt: skip
    assert (plan.generation_slots, plan.scoring_slots) == slots
    rows = 4096 if args is V01 else 8192
    assert plan.tokens_per_slot == rows
    assert plan.bytes_per_slot == rows * 128 * KIB
    # The arithmetic: as many slots as the budget holds after weights and activations.
    fit = (budget - weights - act) // plan.bytes_per_slot
    assert plan.slots == min(fit, 64)
    assert weights + act + plan.cache_bytes <= budget
    assert plan.max_context == 8192
    assert plan.scaled_down == (plan.slots < 64)


def test_seven_b_v02_at_its_full_32k_context_is_refused_with_the_numbers() -> None:
    weights = seven_b_weights()
    budget = card_budget(40 * 10**9, weights)
    act = seven_b_activations(V02, 32768, flash=False)
    with pytest.raises(MemoryBudgetError) as err:
        plan_memory(V02, BF16, max_context=None, budget_bytes=budget, weights_bytes=weights,
                    activation_bytes=act, **ASKED, device="cuda:0", device_total_bytes=40 * 10**9,
                    device_free_bytes=40 * 10**9 - weights)  # fmt: skip
    message = str(err.value)
    for part in (
        "2 slots of 32768 tokens need 8.00 GiB",
        "4.00 GiB per slot",
        "128 KiB per token",
        "weights 13.49 GiB",
        f"budget of {budget / GiB:.2f} GiB",
        "37.25 GiB total",
        "max_context",
    ):
        assert part in message


def test_an_impossible_budget_is_refused() -> None:
    with pytest.raises(MemoryBudgetError, match=r"2 slots of 4096 tokens need 1\.00 GiB"):
        plan_memory(V01, BF16, max_context=None, budget_bytes=14 * 10**9,
                    weights_bytes=seven_b_weights(), activation_bytes=0, **ASKED)  # fmt: skip


def test_fewer_slots_keep_one_of_each_kind() -> None:
    per_slot = 4096 * 128 * KIB
    for asked, fit, want in [((32, 32), 2, (1, 1)), ((1, 64), 10, (1, 9)), ((64, 1), 10, (9, 1)),
                             ((8, 16), 12, (4, 8)), ((8, 16), 100, (8, 16))]:  # fmt: skip
        plan = plan_memory(V01, BF16, max_context=None, budget_bytes=fit * per_slot,
                           weights_bytes=0, activation_bytes=0, max_batch_size=asked[0],
                           score_batch_size=asked[1])  # fmt: skip
        assert (plan.generation_slots, plan.scoring_slots) == want


# Cards as torch reports them (mem_get_info's total): an H200 (141 GB) and an H100 (80 GB).
H200 = int(139.7 * GiB)
H100 = int(79.1 * GiB)


def seven_b_plan(total: int, asked: int | str, **kw: object) -> MemoryPlan:
    weights = seven_b_weights()
    return plan_engine_memory(
        V01, BF16, device="cuda:0", weights_bytes=weights, max_batch_size=asked,
        score_batch_size=asked, chunk_tokens=4096, step_tokens=4096, max_context=8192,
        device_total_bytes=total, device_free_bytes=total - weights - GiB // 2, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_scoring_passes_expanded_keys_count_on_cuda() -> None:
    """On CUDA a label-tree pass's keys and values are padded per sequence and expanded to all
    32 heads (SDPA's memory-efficient kernel): 32 slots reading a 4096-token window hold
    (4096 + 32 x 4096) tokens x (8 + 32) heads x 128 x 2 bytes, for K and V: 2.58 GiB."""
    rows = 4096
    common = dict(step_tokens=4096, chunk_tokens=4096, rows=rows, sequences=32,
                  logits_rows=32 + 32 * 32, materialised_scores=False)  # fmt: skip
    extra = activation_bytes(V01, BF16, **common, expanded_heads=True) - activation_bytes(  # type: ignore[arg-type]
        V01,
        BF16,
        **common,  # type: ignore[arg-type]
    )
    assert extra == (4096 + 32 * rows) * (8 + 32) * 128 * 2 * 2
    # The engine's plan on CUDA counts them; on CPU (scores materialised instead) it does not.
    cuda = engine_activation_bytes(
        V01, BF16, generation_slots=32, scoring_slots=32, step_tokens=4096, chunk_tokens=4096,
        rows=rows, cuda=True,
    )  # fmt: skip
    expanded = activation_bytes(V01, BF16, **common, expanded_heads=True)  # type: ignore[arg-type]
    assert cuda == expanded


@pytest.mark.parametrize(("total", "slots"), [(H200, 99), (H100, 50)])
def test_auto_fills_the_card_with_slots_where_32_left_it_mostly_empty(
    total: int, slots: int
) -> None:
    auto = seven_b_plan(total, "auto")
    fixed = seven_b_plan(total, 32)
    assert (auto.generation_slots, auto.scoring_slots) == (slots, slots)
    assert auto.auto_ceiling == 256 and "auto: as many as fit, at most 256" in auto.describe()
    used = auto.weights_bytes + auto.activation_bytes + auto.cache_bytes
    assert used <= auto.budget_bytes
    # The largest count that fits: one more slot of each, and its larger pass, would not.
    more = engine_activation_bytes(V01, BF16, generation_slots=slots + 1,
                                   scoring_slots=slots + 1, step_tokens=4096, chunk_tokens=4096,
                                   rows=4096, cuda=True)  # fmt: skip
    assert auto.weights_bytes + more + (auto.slots + 2) * auto.bytes_per_slot > auto.budget_bytes
    # The old default of 32 + 32 slots used at most half the H200's budget; auto uses it all
    # but one slot pair and its activations.
    assert used > 0.97 * auto.budget_bytes
    if total == H200:
        fixed_used = fixed.weights_bytes + fixed.activation_bytes + fixed.cache_bytes
        assert fixed_used < 0.5 * fixed.budget_bytes and auto.slots > 3 * fixed.slots


def test_auto_stops_at_256_slots_and_means_32_off_cuda() -> None:
    huge = seven_b_plan(2048 * GiB, "auto")
    assert (huge.generation_slots, huge.scoring_slots) == (256, 256)
    cpu = plan_engine_memory(TINY, torch.float32, device="cpu", weights_bytes=0,
                             max_batch_size="auto", score_batch_size="auto", chunk_tokens=64,
                             step_tokens=64, max_context=256, cache_memory_bytes=GiB)  # fmt: skip
    assert (cpu.generation_slots, cpu.scoring_slots) == (32, 32) and cpu.auto_ceiling is None
    # One side auto, the other fixed: the fixed side is kept.
    one = seven_b_plan(H100, "auto")
    mixed = plan_engine_memory(
        V01, BF16, device="cuda:0", weights_bytes=one.weights_bytes, max_batch_size="auto",
        score_batch_size=8, chunk_tokens=4096, step_tokens=4096, max_context=8192,
        device_total_bytes=H100, device_free_bytes=H100 - one.weights_bytes - GiB // 2,
    )  # fmt: skip
    assert mixed.scoring_slots == 8 and mixed.generation_slots > one.generation_slots
    with pytest.raises(ValueError, match="max_batch_size must be a positive integer or 'auto'"):
        seven_b_plan(H100, "many")


def test_an_auto_engine_on_cpu_asks_for_32_slots_of_each() -> None:
    engine = Engine(tiny_model(), max_batch_size="auto", score_batch_size="auto",
                    max_context=256)  # fmt: skip
    assert (engine.memory.requested_generation_slots, engine.max_batch_size) == (32, 32)
    assert engine.score_batch_size == 32


def test_cpu_default_is_a_quarter_of_available_ram_at_most_4_gib() -> None:
    assert default_cpu_cache_bytes(8 * GiB) == 2 * GiB
    assert default_cpu_cache_bytes(64 * GiB) == 4 * GiB


def test_cuda_budget_counts_what_others_hold() -> None:
    # 10 GiB held besides our 14 GiB of weights: 0.9 x 80 GiB - 10 GiB.
    budget = cuda_budget(total=80 * GiB, free=56 * GiB, weights=14 * GiB, utilization=0.9)
    assert budget == int(72 * GiB) - 10 * GiB
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        cuda_budget(total=GiB, free=GiB, weights=0, utilization=1.5)


# ----------------------------------------------------------------- the engine

TINY = ModelArgs(
    dim=32, n_layers=2, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
    vocab_size=256, sliding_window=None, max_seq_len=32768, rope_theta=1e6,
)  # fmt: skip


def tiny_model(args: ModelArgs = TINY) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(random_weights(args, seed=0), assign=True)
    return model.eval()


def test_a_model_without_a_window_caches_the_context_limit_not_32k() -> None:
    engine = Engine(tiny_model(), max_batch_size=2, score_batch_size=2, max_context=256)
    assert engine.window == 256 and engine.max_context == 256
    assert engine.cache.k.shape[1] == 4 * 256  # 4 slots x 256 rows, not x 32768
    assert engine.memory.tokens_per_slot == 256 and engine.memory.slots == 4
    assert engine.cache.nbytes == engine.memory.cache_bytes
    with pytest.raises(RequestError, match="exceed the context of 256"):
        engine.add_request(GenerationRequest(list(range(3, 250)), 10))
    assert len(engine.generate([list(range(3, 200))], 5, stop_tokens=frozenset())[0]) == 5


def test_with_a_window_max_context_bounds_requests_not_rows() -> None:
    args = ModelArgs(**{**TINY.to_params(), "sliding_window": 64})
    engine = Engine(tiny_model(args), max_batch_size=1, score_batch_size=1, max_context=512)
    assert engine.window == 64 and engine.cache.sliding and engine.max_context == 512
    with pytest.raises(RequestError, match="exceed the context of 512"):
        engine.add_request(GenerationRequest(list(range(3, 200)), 400))
    unbounded = Engine(tiny_model(args), max_batch_size=1, score_batch_size=1)
    assert unbounded.max_context is None


def test_engine_scales_slots_down_to_the_budget_and_logs_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    per_slot = 256 * kv_bytes_per_token(TINY, torch.float32)
    with caplog.at_level(logging.INFO, logger="model.engine"):
        engine = Engine(tiny_model(), max_batch_size=8, score_batch_size=16, max_context=256,
                        cache_memory_bytes=6 * per_slot)  # fmt: skip
    assert (engine.max_batch_size, engine.score_batch_size) == (2, 4)
    assert engine.cache.n_slots == 6 and engine.memory.scaled_down
    [record] = [r for r in caplog.records if r.name == "model.engine"]
    assert record.levelno == logging.WARNING
    assert "6 slots x 256 tokens" in record.message
    assert "2 generation + 4 scoring (asked 8 + 16)" in record.message
    # The slots it has still serve: more requests than slots queue.
    out = engine.generate([[5, 6, 7]] * 3, 4, stop_tokens=frozenset())
    assert out[0] == out[1] == out[2] and len(out[0]) == 4


def test_engine_refuses_to_start_when_two_slots_do_not_fit() -> None:
    per_slot = 256 * kv_bytes_per_token(TINY, torch.float32)
    with pytest.raises(MemoryBudgetError, match="2 slots of 256 tokens"):
        Engine(tiny_model(), max_context=256, cache_memory_bytes=per_slot)


# ------------------------------------------------------------ CPU weights


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packing_for_cpu_does_not_double_the_weights(dtype: torch.dtype) -> None:
    from model.cache import ForwardMetadata
    from model.cpu_gemm import PackedLinear, pack_for_cpu

    args = ModelArgs(**{**TINY.to_params(), "sliding_window": 16})
    model = tiny_model(args).to(dtype)
    plain = tiny_model(args).to(dtype)
    before = weights_bytes(model)
    wk = model.state_dict()["layers.0.attention.wk.weight"].clone()
    dropped = weakref.ref(model.layers[0].feed_forward.w2.weight)
    choice = pack_for_cpu(model, packed=True)
    assert choice is not None and pack_for_cpu(model) is choice  # the second: no change
    assert choice.packed == len(choice.matrices) and all(m.ratio is None for m in choice.matrices)
    gc.collect()
    assert dropped() is None  # freed, not merely unregistered (nothing else refers to it)
    after = weights_bytes(model)
    # Storage accounting: only the output projection is held twice (scoring reads its rows).
    output = args.vocab_size * args.dim * model.output.weight.element_size()
    assert after == before + output
    packed_layers = [m for m in model.layers.modules() if isinstance(m, PackedLinear)]
    assert len(packed_layers) == 4 * args.n_layers  # wqkv, wo, w13, w2
    assert all("weight" not in m._parameters for m in packed_layers)
    # Same results, and a dropped weight can still be read back.
    tokens = torch.tensor([5, 9, 100, 7, 3] * 8)
    meta = ForwardMetadata.fresh([len(tokens)], 16, torch.device("cpu"))
    torch.testing.assert_close(model(tokens, meta), plain(tokens, meta), atol=2e-2, rtol=2e-2)
    kv = args.n_kv_heads * args.head_dim
    q = args.n_heads * args.head_dim
    assert torch.equal(model.layers[0].attention.wqkv.weight[q : q + kv], wk)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)")
@pytest.mark.parametrize("packed", [False, None])
def test_plain_weights_are_kept_in_place_and_give_the_same_results(packed: bool | None) -> None:
    """Where packing does not pay (forced here, or as measured on this host), each matrix keeps
    one plain copy (column-major): nothing doubled; the measured choice says why."""
    from model.cache import ForwardMetadata
    from model.cpu_gemm import PACKING_MARGIN, pack_for_cpu

    args = ModelArgs(**{**TINY.to_params(), "sliding_window": 16})
    model, plain = tiny_model(args), tiny_model(args)
    before = weights_bytes(model)
    wq = model.state_dict()["layers.0.attention.wq.weight"].clone()
    choice = pack_for_cpu(model, packed=packed)
    assert choice is not None
    shapes = {m.shape for m in choice.matrices}
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    assert (q + 2 * kv, args.dim) in shapes and (2 * args.hidden_dim, args.dim) in shapes
    attn = model.layers[0].attention
    if packed is False:
        assert attn.wqkv.packed is None and not attn.wqkv.weight.is_contiguous()  # column-major
        assert weights_bytes(model) == before
    else:  # measured: each shape packed exactly when its measured ratio is below the margin
        for m in choice.matrices:
            assert m.ratio is not None and m.packed == (m.ratio < PACKING_MARGIN)
        assert "measured in" in choice.describe() and "wqkv" in choice.describe()
    assert torch.equal(model.state_dict()["layers.0.attention.wq.weight"], wq)
    if packed is None:  # the output projection: packed (copy) for 8 rows and more at least
        assert model.output.packed is not None and model.output.packed.is_mkldnn
        assert model.output.packed_from_rows in (0, 8)
    # 40 rows (the packed output projection, where there is one) and 1 row (the plain one).
    for tokens in (torch.tensor([5, 9, 100, 7, 3] * 8), torch.tensor([42])):
        meta = ForwardMetadata.fresh([len(tokens)], 16, torch.device("cpu"))
        torch.testing.assert_close(model(tokens, meta), plain(tokens, meta), atol=1e-4, rtol=1e-4)
