"""The engine on CUDA against the same engine on CPU in fp32: same random weights, same schedule
of passes, a window small enough that every sequence wraps the rolling buffer several times.

    PYTHONPATH=. python bench/gpu_parity.py [--device cuda] [--dtypes bf16,fp32]

Needs only torch and the model package (no pytest, transformers or safetensors). Prints one
line per check, PASS, FAIL or SKIP, and exits 1 when one fails. `--device cpu` rehearses the
checks on the CPU (bf16 against fp32), which is how the tolerances are known to be neither
vacuous nor too tight.
Checks: chunked pre-fill mixed with decode in one pass, decode-only steps, scoring with token
trees and a reused prefix, greedy generation through the continuous-batching step loop.
`against_transformers` (for bench/gpu_measure.py; needs transformers and safetensors) compares
with the reference implementation on the same device.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass

import torch

from bench.gpu_bench import random_model
from model import Engine, ModelArgs, ScoreRequest
from model.transformer import Transformer

W = 16
ARGS = ModelArgs(
    dim=64, n_layers=2, head_dim=16, hidden_dim=160, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
    vocab_size=512, rope_theta=10000.0, sliding_window=W, max_seq_len=4096,
)  # fmt: skip
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Largest |difference| allowed, as a fraction of the reference's largest |logit| (at least 1):
# fp32 differs only by summation order; bf16 keeps 8 bits of mantissa through every layer.
LOGIT_TOL = {torch.float32: 1e-3, torch.bfloat16: 6e-2}
# Summed log-probabilities of 1-3 tokens, in nats.
SCORE_TOL = {torch.float32: 1e-3, torch.bfloat16: 0.1}


@dataclass
class Check:
    name: str
    ok: bool | None  # None: skipped
    detail: str

    def line(self) -> str:
        status = "SKIP" if self.ok is None else "PASS" if self.ok else "FAIL"
        return f"{status} {self.name}: {self.detail}"


def build(
    state: dict[str, torch.Tensor], device: str, dtype: torch.dtype, args: ModelArgs = ARGS
) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict({k: v.to(device, dtype) for k, v in state.items()}, assign=True)
    return model.eval()


def make_engine(model: Transformer) -> Engine:
    return Engine(model, max_batch_size=3, score_batch_size=3, chunk_size=5,
                  cache_memory_bytes=64 << 20)  # fmt: skip


def tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, ARGS.vocab_size, (n,), generator=g).tolist()


def mixed_passes(engine: Engine) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of every token of three wrapping sequences fed as pre-fill chunks mixed with
    decode tokens in the same passes, then (once all prompts are in) decode-only passes."""
    lengths = [7 * W + 3, 4 * W + 1, 2 * W - 5]
    seqs = [tokens(n, seed=10 + n) for n in lengths]
    prompt_lens = [n // 2 for n in lengths]
    fed = [0] * 3
    mixed: list[torch.Tensor] = []
    decode: list[torch.Tensor] = []
    while any(f < len(s) for f, s in zip(fed, seqs, strict=True)):
        batch = []
        for i, s in enumerate(seqs):
            if fed[i] < len(s):
                step = 5 if fed[i] < prompt_lens[i] else 1
                batch.append((i, s[fed[i] : fed[i] + step]))
        rows = list(range(sum(len(c) for _, c in batch)))
        logits = engine.passes.forward(
            [i for i, _ in batch], [c for _, c in batch], logits_rows=rows
        )
        (decode if all(len(c) == 1 for _, c in batch) else mixed).append(logits.float().cpu())
        for i, chunk in batch:
            fed[i] += len(chunk)
    for slot in range(3):
        engine.cache.reset(slot)
    return torch.cat(mixed), torch.cat(decode)


def scores(engine: Engine) -> torch.Tensor:
    shared = tokens(2 * W + 3, seed=8)
    prefix = engine.prefill_prefix(shared)
    conts = [[3, 4], [3, 5, 6], [7, 8], [9]]
    bodies = [tokens(n, seed=30 + n) for n in (4, W + 1, 1, 3 * W)]
    requests = [ScoreRequest(b, conts, prefix) for b in bodies]
    requests += [ScoreRequest(shared + b, conts) for b in bodies[:2]]
    return torch.tensor(engine.score_batch(requests))


def greedy(engine: Engine) -> list[list[int]]:
    prompts = [tokens(n, seed=20 + n) for n in (W + 3, 5, 2 * W)]
    return engine.generate(prompts, 3 * W, stop_tokens=frozenset())


def close(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float, unit: str) -> Check:
    scale = max(1.0, float(ref.abs().max())) if unit == "of the logit scale" else 1.0
    err = float((got.float() - ref.float()).abs().max()) / scale
    detail = f"max |diff| {err:.2e} {unit} (tolerance {tol:.0e}, {ref.numel()} values)"
    return Check(name, err <= tol, detail)


def run(device: str, dtype_names: list[str]) -> list[Check]:
    # Made by torch alone (model.demo's needs safetensors, which a bare GPU image lacks).
    state = {
        k: v.clone() for k, v in random_model(ARGS, "cpu", torch.float32, 1).state_dict().items()
    }
    reference = make_engine(build(state, "cpu", torch.float32))
    ref_mixed, ref_decode = mixed_passes(reference)
    ref_scores = scores(reference)
    ref_tokens = greedy(reference)
    checks = []
    for name in dtype_names:
        dtype = DTYPES[name]
        engine = make_engine(build(state, device, dtype))
        tag = f"{device} {name} vs cpu fp32"
        mixed, decode = mixed_passes(engine)
        tol = LOGIT_TOL[dtype]
        checks.append(close(f"{tag}: pre-fill + decode passes", mixed, ref_mixed, tol,
                            "of the logit scale"))  # fmt: skip
        checks.append(close(f"{tag}: decode-only steps", decode, ref_decode, tol,
                            "of the logit scale"))  # fmt: skip
        checks.append(close(f"{tag}: scoring with a reused prefix", scores(engine), ref_scores,
                            SCORE_TOL[dtype], "nats"))  # fmt: skip
        got = greedy(engine)
        same = sum(a == b for g, r in zip(got, ref_tokens, strict=True)
                   for a, b in zip(g, r, strict=True))  # fmt: skip
        total = sum(len(r) for r in ref_tokens)
        detail = f"{same}/{total} greedy tokens equal (backend {engine.backend.name})"
        # bf16 may flip a near-tie and then diverge: reported, held to equality only in fp32.
        checks.append(Check(f"{tag}: greedy generation", same == total or dtype != torch.float32,
                            detail))  # fmt: skip
    return checks


def against_transformers(
    args: ModelArgs, n: int, device: str, dtype: torch.dtype
) -> tuple[float, str]:
    """Ours against transformers' MistralForCausalLM on `device` in `dtype`, same random
    weights: our logits of every token of a sequence wrapping the window, from chunked
    pre-fill and then decode steps through the rolling cache, theirs from one full forward
    with the sliding-window mask. (max |diff| / logit scale, what was compared)."""
    from transformers import MistralForCausalLM

    from model.weights import save_hf

    made = random_model(args, "cpu", torch.float32, 3).state_dict()
    state = {k: v.clone() for k, v in made.items()}
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(3, args.vocab_size, (n,), generator=g).tolist()
    prefilled = n * 6 // 7  # in chunks; the rest in decode steps
    chunk = max(1, prefilled // 6)
    spans = [(i, min(i + chunk, prefilled)) for i in range(0, prefilled, chunk)]
    spans += [(i, i + 1) for i in range(prefilled, n)]
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(tmp, args, state)
        hf = MistralForCausalLM.from_pretrained(tmp, attn_implementation="sdpa", dtype=dtype)
    hf = hf.to(device).eval()  # type: ignore[arg-type]
    with torch.inference_mode():
        ref = hf(torch.tensor([tokens], device=device)).logits[0].float()
    del hf
    engine = Engine(build(state, device, dtype, args), max_batch_size=1, score_batch_size=1,
                    chunk_size=chunk)  # fmt: skip
    got = [
        engine.passes.forward([0], [tokens[i:j]], logits_rows=list(range(j - i))) for i, j in spans
    ]
    scale = max(1.0, float(ref.abs().max()))
    diff = float((torch.cat(got).float() - ref).abs().max()) / scale
    detail = (f"{n} tokens, window {args.window}, {len(spans)} passes, backend "
              f"{engine.backend.name}")  # fmt: skip
    return diff, detail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", default="bf16,fp32")
    ns = parser.parse_args()
    names = ns.dtypes.split(",")
    if ns.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"SKIP {ns.device} parity: CUDA absent (torch {torch.__version__})")
        return 0
    checks = run(ns.device, names)
    for c in checks:
        print(c.line(), flush=True)
    return 0 if all(c.ok is not False for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
