"""FlexAttention against SDPA on this machine, and the decode graphs' recompiles (issue #24).

Same run, same engine and cache (the backend is swapped between timings, which alternate so
that a burst of another process's work hits both): a chunked pre-fill past the window and a
classification-like scoring pass (prompts + a 13-label tree), at the ~60M bench model and at
Mistral 7B's layer structure and window with tiny widths (bench/engine_7b_bench.py). Decode
steps take the same path under both backends (SDPA over the filled rows), so they are not
compared. `flex` is the eager FlexAttention (what `--attention-backend flex` runs on CPU);
`flex compiled` the generated kernel (torch.compile of flex_attention), after its compile.

Then the decode graphs (model/graphs.py) forced on CPU: start-up warm-up time, graphs dynamo
compiled, and graphs compiled by a serving mix of batch sizes 1..8 after warm-up (goal: 0).

    python bench/flex_bench.py [--repeats N] [--models 60m,7b] [--no-compiled]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BENCH_ARGS, machine
from model import Engine, GenerationRequest, ModelArgs, ScoreRequest
from model.args import MISTRAL_7B
from model.attention import AttentionBackend, SdpaBackend, flex_backend
from model.demo import random_weights
from model.memory import kv_bytes_per_token
from model.transformer import Transformer

STRUCTURE_7B = dataclasses.replace(MISTRAL_7B, dim=256, hidden_dim=512)
# 13 labels as the mistral-13 policy's tree: shared first tokens, 1-3 tokens each.
LABELS = [[4], [5, 6], [5, 7], [8, 9, 10], [8, 9, 11], [12], [13, 14], [15], [16, 17],
          [18], [19, 20, 21], [22], [23]]  # fmt: skip


def build(args: ModelArgs) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(random_weights(args, seed=0), assign=True)
    return model.eval()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(
    engine: Engine, backends: dict[str, AttentionBackend], work: Callable[[], object], repeats: int
) -> dict[str, float]:
    """Fastest time of `work` under each backend, alternating, after one warm-up each."""
    best = {name: float("inf") for name in backends}
    warm = {}
    for name, backend in backends.items():
        engine.backend = backend
        warm[name] = timed(work)  # includes a compiled kernel's compile
    for _ in range(repeats):
        for name, backend in backends.items():
            engine.backend = backend
            best[name] = min(best[name], timed(work))
    for name, seconds in warm.items():
        if name.endswith("compiled"):
            print(f"      ({name}: first call {seconds:.1f} s, compile included)")
    return best


def bench_model(label: str, args: ModelArgs, prompt: int, chunk: int, texts: int,
                repeats: int, compiled: bool) -> None:  # fmt: skip
    model = build(args)
    slots = 1 + texts
    engine = Engine(
        model, max_batch_size=1, score_batch_size=texts, chunk_size=chunk, backend="sdpa",
        cache_memory_bytes=slots * args.window * kv_bytes_per_token(args, model.dtype),
    )  # fmt: skip
    backends: dict[str, AttentionBackend] = {
        "sdpa": SdpaBackend(),
        "flex": flex_backend(torch.device("cpu")),
    }
    if compiled:
        backends["flex compiled"] = flex_backend(torch.device("cpu"), compile_kernel=True)
    g = torch.Generator().manual_seed(0)
    long_prompt = torch.randint(3, args.vocab_size, (prompt,), generator=g).tolist()
    lengths = [90 + 7 * i for i in range(texts)]
    requests = [
        ScoreRequest(torch.randint(3, args.vocab_size, (n,), generator=g).tolist(), LABELS)
        for n in lengths
    ]

    def prefill_chunked() -> None:
        engine.cache.reset(0)
        engine.passes.prefill([0], [long_prompt])
        engine.cache.reset(0)

    def classify() -> None:
        engine.score_batch(requests, relative=True)

    decode_prompt = long_prompt[: args.window // 2]

    def decode() -> None:
        """16 decode steps of one sequence whose window is half full (pre-fill untimed)."""
        rid = engine.add_request(GenerationRequest(decode_prompt, 17, stop_tokens=frozenset()))
        while not engine.step():  # the pre-fill, chunk by chunk, until the first token
            pass
        start = time.perf_counter()
        for _ in range(16):
            engine.step()
        decode_seconds.append(time.perf_counter() - start)
        engine.cancel(rid)

    decode_seconds: list[float] = []

    print(f"\n## {label}: window {args.window}, {args.n_layers} layers, heads "
          f"{args.n_heads}/{args.n_kv_heads}, head_dim {args.head_dim}")  # fmt: skip
    names = list(backends)
    print(f"{'work':<44}" + "".join(f"{n:>15}" for n in names) + "  flex/sdpa")
    for what, work in (
        (f"pre-fill {prompt} tokens, chunks of {chunk}", prefill_chunked),
        (f"classify {texts} texts (~{sum(lengths) // texts} tokens) x 13 labels", classify),
    ):
        best = compare(engine, backends, work, repeats)
        ratios = "  ".join(f"{best[n] / best['sdpa']:.2f}x" for n in names[1:])
        print(f"{what:<44}" + "".join(f"{best[n] * 1e3:13.1f}ms" for n in names) + f"  {ratios}")
    # Decode: SDPA over the filled rows (also flex's default) against flex_decode=True.
    decoders: dict[str, AttentionBackend] = {
        "sdpa": backends["sdpa"],
        "flex_decode": flex_backend(torch.device("cpu"), flex_decode=True),
    }
    per_step: dict[str, float] = {}
    for _ in range(repeats + 1):
        for name, backend in decoders.items():
            engine.backend = backend
            decode_seconds.clear()
            decode()
            per_step[name] = min(per_step.get(name, float("inf")), decode_seconds[0] / 16)
    print(f"{'decode step, 1 sequence, window half full':<44}{per_step['sdpa'] * 1e3:13.1f}ms"
          f"{per_step['flex_decode'] * 1e3:13.1f}ms (flex_decode)  "
          f"{per_step['flex_decode'] / per_step['sdpa']:.2f}x")  # fmt: skip


def bench_graphs() -> None:
    args = BENCH_ARGS
    model = build(args)
    start = time.perf_counter()
    engine = Engine(model, max_batch_size=8, score_batch_size=1, compile=True, compile_on_cpu=True)
    total = time.perf_counter() - start
    graphs = engine.passes.decode_step
    assert graphs is not None
    g = torch.Generator().manual_seed(1)
    steps = 0
    sizes: set[int] = set()
    # Requests arrive while others run: decode steps of every batch size 1..8, spans 64..256.
    for wave in range(4):
        for i in range(2 * wave + 1):
            n = int(torch.randint(3, 200, (1,), generator=g))
            prompt = torch.randint(3, args.vocab_size, (n,), generator=g).tolist()
            engine.add_request(GenerationRequest(prompt, 20 + 40 * i, stop_tokens=frozenset()))
        for _ in range(30):
            sizes.add(engine.num_running)
            engine.step()
            steps += 1
    while engine.has_unfinished():
        sizes.add(engine.num_running)
        engine.step()
        steps += 1
    print(
        f"\n## decode graphs, 60M, --max-batch-size 8 (compile forced on CPU, dynamo backend "
        f"eager)\nbuckets {graphs.buckets} x spans {graphs.spans}: warm-up "
        f"{graphs.capture_seconds:.1f} s of the engine's {total:.1f} s start-up, "
        f"{graphs.compiles} graphs compiled; serving mix of {steps} steps, batch sizes "
        f"{sorted(sizes)}: {graphs.recompiles_since_warm_up()} graphs compiled after warm-up"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="60m,7b")
    parser.add_argument("--no-compiled", action="store_true", help="skip the compiled kernel")
    parser.add_argument("--no-graphs", action="store_true", help="skip the decode graphs")
    ns = parser.parse_args()
    torch.manual_seed(0)
    print(f"# FlexAttention vs SDPA, fp32, one run; {machine()}")
    models = ns.models.split(",")
    if "60m" in models:
        bench_model("60M bench model", BENCH_ARGS, 1024, 256, 8, ns.repeats, not ns.no_compiled)
    if "7b" in models:
        # Eager flex materialises a chunk's scores (32 heads x chunk x keys): 512-token chunks.
        bench_model("7B layer structure, dim 256", STRUCTURE_7B, 1536, 512, 2, ns.repeats, False)
    if not ns.no_graphs:
        bench_graphs()


if __name__ == "__main__":
    main()
