"""The 7B shape on one GPU with random bf16 weights: flash-attn parity with SDPA, pre-fill and
decode tokens/s at batch 1 and 32, against the chip's peak as the yardstick.

    python bench/gpu_bench.py [--peak-tflops 790] [--peak-tbps 4.8]

Needs CUDA and the flash-attn package (the `gpu` extra). The yardsticks default to an H200:
about 790 TFLOP/s dense bf16 and 4.8 TB/s of memory bandwidth. Decode is bandwidth bound (every
step reads all weights once), pre-fill compute bound (2 FLOPs per parameter per token).
"""

from __future__ import annotations

import argparse
import time

import torch

from model import Engine, GenerationRequest, ModelArgs
from model.args import MISTRAL_7B
from model.transformer import Transformer

SEVEN_B = MISTRAL_7B


def random_model(args: ModelArgs) -> Transformer:
    """Random bf16 weights made on the GPU (no 14 GB host round trip)."""
    with torch.device("meta"):
        model = Transformer(args)
    state = {}
    for name, p in model.state_dict().items():
        t = torch.empty(p.shape, device="cuda", dtype=torch.bfloat16)
        if t.dim() == 1:
            t.fill_(1.0)
        else:
            t.normal_(0.0, t.shape[-1] ** -0.5)
        state[name] = t
    model.load_state_dict(state, assign=True)
    return model.eval()


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak-tflops", type=float, default=790.0)
    parser.add_argument("--peak-tbps", type=float, default=4.8)
    parser.add_argument("--prefill-tokens", type=int, default=8192)
    parser.add_argument("--new-tokens", type=int, default=64)
    ns = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    model = random_model(SEVEN_B)
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = params * 2
    print(f"# 7B shape, {params / 1e9:.2f}B params bf16, {torch.cuda.get_device_name()}")

    # Parity: one chunked pre-fill through flash-attn and through SDPA.
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, SEVEN_B.vocab_size, (3 * 4096 // 2,), generator=g).tolist()
    engines = {
        b: Engine(model, max_batch_size=32, score_batch_size=1, backend=b)
        for b in ("flash", "sdpa")
    }
    rows = list(range(0, len(prompt), 97))
    logits = {b: e._forward([0], [prompt], logits_rows=rows) for b, e in engines.items()}
    diff = (logits["flash"] - logits["sdpa"]).abs().max().item()
    scale = logits["sdpa"].abs().max().item()
    print(f"flash vs sdpa logits: max |diff| {diff:.3e} (logit scale {scale:.1f})")
    for e in engines.values():
        e.cache.reset(0)

    engine = engines["flash"]
    tokens = torch.randint(3, SEVEN_B.vocab_size, (ns.prefill_tokens,), generator=g).tolist()

    def prefill() -> None:
        engine.cache.reset(0)
        engine._prefill([0], [tokens])

    prefill()
    t = timed(prefill)
    tps = ns.prefill_tokens / t
    mfu = 2 * params * tps / (ns.peak_tflops * 1e12)
    print(f"pre-fill {ns.prefill_tokens} tokens: {tps:,.0f} tok/s, {mfu:.0%} of peak bf16 FLOP/s")

    for batch in (1, 32):
        prompts = [
            torch.randint(3, SEVEN_B.vocab_size, (128,), generator=g).tolist() for _ in range(batch)
        ]
        decode_steps(engine, prompts, ns.new_tokens)  # warm-up
        seconds, steps = decode_steps(engine, prompts, ns.new_tokens)
        per_step = seconds / steps
        bw = weight_bytes / per_step / (ns.peak_tbps * 1e12)
        print(
            f"decode batch {batch:2d}: {batch / per_step:,.0f} tok/s "
            f"({per_step * 1e3:.1f} ms/step), weights read at {bw:.0%} of peak bandwidth"
        )


def decode_steps(engine: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, int]:
    """Seconds and steps of the decode phase (the pre-fill step excluded)."""
    for p in prompts:
        engine.add_request(GenerationRequest(p, new_tokens, stop_tokens=frozenset()))
    engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    torch.cuda.synchronize()
    return time.perf_counter() - start, steps


if __name__ == "__main__":
    main()
