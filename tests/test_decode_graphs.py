"""Decode steps as compiled graphs over batch buckets (model/graphs.py), forced on CPU: every
bucket is compiled before the engine serves, and a serving mix of batch sizes 1..max and of
spans then compiles nothing more, with the eager engine's tokens."""

from __future__ import annotations

import pytest
import torch

from model import Engine, GenerationRequest, ModelArgs
from model.attention import flex_backend
from model.demo import random_weights
from model.graphs import batch_buckets, span_buckets
from model.transformer import Transformer
from moderation.core.limits import ModelLimits

W = 128  # two span buckets (64, 128): steps change span as sequences grow and wrap
ARGS = ModelArgs(
    dim=64, n_layers=1, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
    vocab_size=256, sliding_window=W, max_seq_len=4096,
)  # fmt: skip


def tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, ARGS.vocab_size, (n,), generator=g).tolist()


def test_buckets() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(4) == [1, 2, 4]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert span_buckets(4096) == [64, 128, 256, 512, 1024, 2048, 4096]
    assert span_buckets(16) == [16]


def serve(engine: Engine) -> dict[int, list[int]]:
    """A serving mix: requests arrive while others run, so decode steps see every batch size
    from 1 to 5 and spans of both buckets (one sequence alone crosses 64 and wraps 128)."""
    arrivals = {
        0: [(tokens(5, 1), 150)],
        3: [(tokens(40, 2), 12), (tokens(9, 3), 30)],
        8: [(tokens(70, 4), 6), (tokens(3, 5), 20)],
        14: [(tokens(2, 6), 8)],
    }
    out: dict[int, list[int]] = {}
    step = 0
    while step in arrivals or engine.has_unfinished() or step < max(arrivals):
        for prompt, n in arrivals.get(step, []):
            rid = engine.add_request(GenerationRequest(prompt, n, stop_tokens=frozenset()))
            out[rid] = []
        for ev in engine.step():
            out[ev.request_id].append(ev.token)
        step += 1
    return out


@pytest.mark.parametrize("decode", ["sdpa", "flex"])
def test_a_serving_mix_compiles_nothing_after_warm_up(decode: str) -> None:
    """Decode through SDPA over the filled rows, or FlexAttention over the slots in place."""
    with torch.device("meta"):
        model = Transformer(ARGS)
    model.load_state_dict(random_weights(ARGS, seed=3), assign=True)
    model.eval()
    eager = Engine(model, max_batch_size=5, score_batch_size=1, compile=False)
    backend = flex_backend(torch.device("cpu"), flex_decode=True) if decode == "flex" else "sdpa"
    graphed = Engine(model, max_batch_size=5, score_batch_size=1, compile=True,
                     compile_on_cpu=True, backend=backend)  # fmt: skip
    graphs = graphed.passes.decode_step
    assert graphs is not None and graphs.buckets == [1, 2, 4, 5] and graphs.spans == [64, 128]
    assert graphs.compiles >= 1 and graphed.graph_capture_seconds is not None
    # What GetModelInfo reports (decode_graph_batch_sizes, graph_capture_seconds).
    limits = ModelLimits.of(graphed)
    assert limits.graph_batch_sizes == (1, 2, 4, 5) and limits.graph_capture_seconds > 0
    assert ModelLimits.of(eager).graph_batch_sizes == ()
    sizes: list[int] = []
    real_decode = graphs.decode

    def spy(slots, tokens, rows):  # type: ignore[no-untyped-def]
        sizes.append(len(slots))
        return real_decode(slots, tokens, rows)

    graphs.decode = spy  # type: ignore[method-assign]
    got = serve(graphed)
    assert got == serve(eager)
    assert set(sizes) == {1, 2, 3, 4, 5}  # 3 is padded to the bucket of 4
    assert graphs.recompiles_since_warm_up() == 0 and graphed.graph_recompiles == 0
    assert eager.graph_recompiles is None
    assert graphed.stats.tokens_computed == eager.stats.tokens_computed  # padding not counted


def test_compile_is_the_default_on_cuda_only() -> None:
    with torch.device("meta"):
        model = Transformer(ARGS)
    model.load_state_dict(random_weights(ARGS, seed=3), assign=True)
    assert Engine(model.eval(), max_batch_size=2, score_batch_size=1).passes.decode_step is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_serve_the_mix_without_recompiles() -> None:
    with torch.device("meta"):
        model = Transformer(ARGS)
    model.load_state_dict(random_weights(ARGS, seed=3), assign=True)
    model = model.to("cuda").eval()
    eager = Engine(model, max_batch_size=5, score_batch_size=1, compile=False, backend="sdpa")
    graphed = Engine(model, max_batch_size=5, score_batch_size=1, backend="flex")
    assert graphed.passes.decode_step is not None  # the default on CUDA
    assert serve(graphed) == serve(eager)
    assert graphed.passes.decode_step.recompiles_since_warm_up() == 0
