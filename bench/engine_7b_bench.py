"""Decode at Mistral 7B's layer structure, tiny widths, against transformers in the same run.

The 7B structure where it sets the cost of a decode step's overheads and attention: 32 layers,
32 query heads and 8 KV heads of head_dim 128, window 4096, vocab 32000; the widths that only
scale the matrix work are tiny (dim 256, hidden 512), so the step's fixed costs and its
attention over the cache are what is measured. 16-token prompts, greedy decode; per step =
(time of 1 + N new tokens - time of 1 new token) / N, so pre-fill is left out for both.
Also prints aten ops and host syncs per decode step (model/step_counts.py).

    python bench/engine_7b_bench.py [--repeats N] [--steps N] [--batches 1,32] [--compile]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine
from model import Engine, GenerationRequest, ModelArgs, load_model
from model.demo import random_weights
from model.step_counts import StepCounter
from model.tokenizer import mistral_common_tokenizer_path
from model.weights import save_hf

STRUCTURE_7B = ModelArgs(
    dim=256,
    n_layers=32,
    head_dim=128,
    hidden_dim=512,
    n_heads=32,
    n_kv_heads=8,
    norm_eps=1e-5,
    vocab_size=32000,
    rope_theta=10000.0,
    sliding_window=4096,
    max_seq_len=32768,
)


def checkpoint(root: Path, args: ModelArgs) -> Path:
    folder = root / "structure-7b-hf"
    save_hf(folder, args, random_weights(args, seed=0))
    shutil.copyfile(mistral_common_tokenizer_path("v1"), folder / "tokenizer.model")
    return folder


def per_step(run, steps: int, repeats: int) -> float:  # type: ignore[no-untyped-def]
    """Seconds per decode step: best of `repeats` of (run(1 + steps) - run(1)) / steps."""
    run(2)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(1)
        t1 = time.perf_counter()
        run(1 + steps)
        t2 = time.perf_counter()
        best = min(best, ((t2 - t1) - (t1 - t0)) / steps)
    return best


def step_counts(engine: Engine, batch: int, prompt_len: int) -> StepCounter:
    """Counts for one decode step of `batch` sequences (after their pre-fill)."""
    g = torch.Generator().manual_seed(1)
    ids = [
        engine.add_request(
            GenerationRequest(
                torch.randint(3, 32000, (prompt_len,), generator=g).tolist(),
                8,
                stop_tokens=frozenset(),
            )
        )
        for _ in range(batch)
    ]
    engine.step()  # pre-fill
    engine.step()  # first decode step (warm)
    with StepCounter() as counts:
        engine.step()
    for i in ids:
        engine.cancel(i)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument(
        "--head-dim",
        type=int,
        default=128,
        help="128 is the real one; its cache is 1 GiB per slot in fp32 (window 4096), so batch "
        "32 needs 33 GiB: use 32 on a smaller machine",
    )
    parser.add_argument("--compile", action="store_true", help="Engine(compile=True)")
    ns = parser.parse_args()
    args = dataclasses.replace(STRUCTURE_7B, head_dim=ns.head_dim)
    from transformers import MistralForCausalLM

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = checkpoint(Path(tmp), args)
        hf = MistralForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
        ours = load_model(folder)
    batches = [int(b) for b in ns.batches.split(",")]
    kwargs = {"compile": True} if ns.compile else {}
    engine = Engine(ours, max_batch_size=max(batches), score_batch_size=1, **kwargs)
    print(
        "# decode at the 7B layer structure (32 layers, 32/8 heads, window 4096,"
        f" head_dim {ns.head_dim},"
        f" dim 256, hidden 512, vocab 32000), {ns.prompt}-token prompts; {machine()}"
    )
    print(
        f"{'batch':>5} {'transformers':>13} {'ours':>9} {'ratio':>7} {'target':>7}"
        f" {'aten ops':>9} {'views':>6} {'syncs':>6} {'transfers':>9}"
    )
    failed = False
    for batch in batches:
        prompts = torch.randint(3, STRUCTURE_7B.vocab_size, (batch, ns.prompt))

        def hf_run(new: int, prompts: torch.Tensor = prompts) -> None:
            with torch.inference_mode():
                hf.generate(
                    prompts,
                    attention_mask=torch.ones_like(prompts),
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                    pad_token_id=0,
                )

        def our_run(new: int, prompts: torch.Tensor = prompts) -> None:
            engine.generate([p.tolist() for p in prompts], new, stop_tokens=frozenset())

        # Alternate the two so that a burst of noise on the shared CPU hits both.
        t_hf = per_step(hf_run, ns.steps, ns.repeats)
        t_ours = per_step(our_run, ns.steps, ns.repeats)
        t_hf = min(t_hf, per_step(hf_run, ns.steps, 1))
        counts = step_counts(engine, batch, ns.prompt)
        ratio = t_hf / t_ours
        failed |= ratio < 1.2
        print(
            f"{batch:5d} {t_hf * 1e3:11.1f}ms {t_ours * 1e3:7.1f}ms {ratio:6.2f}x {1.2:6.1f}x"
            f" {counts.ops:9d} {counts.views:6d} {counts.syncs:6d} {counts.transfers:9d}"
        )
        if counts.syncs:
            print(f"      syncs: {dict(counts.sync_reasons)}")
    print("all targets met" if not failed else "SOME TARGETS MISSED")


if __name__ == "__main__":
    main()
