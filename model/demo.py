"""A tiny random-weight checkpoint with the real Mistral v1 tokenizer, for demos and tests.

Its answers are noise; it exists so the whole service runs end to end without a GPU or the
14 GB of real weights. `python -m model.demo OUT_DIR` writes one.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch

from model.args import ModelArgs
from model.tokenizer import mistral_common_tokenizer_path
from model.weights import expected_shapes, save_consolidated

# Mistral 7B's shape, scaled down: GQA (4 query heads share 2 KV heads) and a sliding window
# smaller than a typical prompt, so the rolling cache and chunked pre-fill are exercised.
DEMO_ARGS = ModelArgs(
    dim=64,
    n_layers=2,
    head_dim=16,
    hidden_dim=192,
    n_heads=4,
    n_kv_heads=2,
    norm_eps=1e-5,
    vocab_size=32000,
    rope_theta=10000.0,
    sliding_window=32,
    max_seq_len=8192,
)

_README = """\
This is a RANDOM-WEIGHT DEMO checkpoint, not Mistral 7B.

It has the Mistral architecture at a tiny size (see params.json, "demo": true) and the real
Mistral v1 tokenizer, so the service runs end to end on a CPU. Its outputs are meaningless:
do not use its moderation decisions for anything.
"""


def random_weights(
    args: ModelArgs, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Deterministic random state dict (consolidated names) for `args`.

    Matrices get std 1/sqrt(fan_in): with GPT-2's 0.02 a 64-wide model has q.k ~ 0, so
    attention is a near-uniform average and logits are near-uniform (std ~0.16), and tests
    comparing RoPE, masks or cache paths barely see a bug. Here logits have std ~1 and the
    context moves them by ~2. Norm weights are 1 + small noise, so a loader that drops or
    swaps them changes the logits.
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(args).items():
        if len(shape) == 1:
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            # Embedding rows are read directly: unit scale. Linear layers: 1/sqrt(fan_in).
            std = 1.0 if name == "tok_embeddings.weight" else 1.0 / math.sqrt(shape[1])
            tensor = std * torch.randn(shape, generator=generator)
        state[name] = tensor.to(dtype)
    return state


def write_demo_checkpoint(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write the demo checkpoint (consolidated layout + tokenizer.model + README.txt)."""
    out = Path(out_dir)
    state = random_weights(DEMO_ARGS, seed=seed)
    save_consolidated(out, DEMO_ARGS, state, extra_params={"demo": True})
    shutil.copyfile(mistral_common_tokenizer_path("v1"), out / "tokenizer.model")
    (out / "README.txt").write_text(_README)
    return out


def is_demo_checkpoint(path: str | Path) -> bool:
    """Whether a checkpoint folder is a random-weight demo (its params.json says "demo")."""
    params = Path(path) / "params.json"
    try:
        data = json.loads(params.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("demo") is True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m model.demo", description="Write a tiny random-weight demo checkpoint."
    )
    parser.add_argument("out_dir", type=Path, help="folder to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    ns = parser.parse_args(argv)
    print(write_demo_checkpoint(ns.out_dir, seed=ns.seed))


if __name__ == "__main__":
    main()
