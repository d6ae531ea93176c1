"""The random-weight demo checkpoint: written by `python -m model.demo`, loadable, deterministic."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.demo import DEMO_ARGS, is_demo_checkpoint, random_weights, write_demo_checkpoint
from model.tokenizer import Tokenizer
from model.weights import expected_shapes, load_checkpoint, save_consolidated

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Written through the command line, as the Dockerfile and README do it."""
    out = tmp_path_factory.mktemp("demo") / "demo-model"
    result = subprocess.run(
        [sys.executable, "-m", "model.demo", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == str(out)
    return out


def test_cli_writes_loadable_checkpoint(demo_dir: Path) -> None:
    assert sorted(p.name for p in demo_dir.iterdir()) == [
        "README.txt",
        "consolidated.safetensors",
        "params.json",
        "tokenizer.model",
    ]
    assert "RANDOM-WEIGHT DEMO" in (demo_dir / "README.txt").read_text()
    args, state = load_checkpoint(demo_dir)
    assert args == DEMO_ARGS
    for name, tensor in random_weights(DEMO_ARGS, seed=0).items():
        assert torch.equal(state[name], tensor), name
    tokenizer = Tokenizer.from_file(demo_dir)
    assert tokenizer.version == "v1" and tokenizer.n_words == args.vocab_size


def test_deterministic(tmp_path: Path, demo_dir: Path) -> None:
    """Same seed, same bytes; another seed, other weights."""
    again = write_demo_checkpoint(tmp_path / "again")
    for name in ("params.json", "consolidated.safetensors", "tokenizer.model", "README.txt"):
        assert (again / name).read_bytes() == (demo_dir / name).read_bytes(), name
    other = write_demo_checkpoint(tmp_path / "other", seed=1)
    assert (other / "consolidated.safetensors").read_bytes() != (
        demo_dir / "consolidated.safetensors"
    ).read_bytes()


def test_is_demo_checkpoint(tmp_path: Path, demo_dir: Path) -> None:
    assert is_demo_checkpoint(demo_dir)
    real = save_consolidated(tmp_path / "real", DEMO_ARGS, random_weights(DEMO_ARGS))
    assert not is_demo_checkpoint(real)
    assert not is_demo_checkpoint(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "params.json").write_text("[not an object")
    assert not is_demo_checkpoint(tmp_path / "bad")


def test_demo_args_exercise_the_engine() -> None:
    """GQA and a window shorter than a typical prompt, with the real v1 vocabulary."""
    assert DEMO_ARGS.n_heads > DEMO_ARGS.n_kv_heads
    assert DEMO_ARGS.sliding_window is not None and DEMO_ARGS.sliding_window < 64
    assert DEMO_ARGS.vocab_size == 32000


def test_random_weights_shapes_and_scale() -> None:
    state = random_weights(DEMO_ARGS, seed=0, dtype=torch.bfloat16)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_shapes(DEMO_ARGS)
    assert {v.dtype for v in state.values()} == {torch.bfloat16}
    norm = state["norm.weight"].float()
    assert norm.min() > 0.5 and norm.max() < 1.5 and norm.std() > 0.01
    wq = state["layers.0.attention.wq.weight"].float()
    assert abs(wq.std().item() - DEMO_ARGS.dim**-0.5) < 0.02


def test_demo_logits_are_not_degenerate(demo_dir: Path) -> None:
    """Logits vary with the token and with the context (attention matters), and are finite."""
    from model.cache import ForwardMetadata
    from model.weights import load_model

    model = load_model(demo_dir)
    tokenizer = Tokenizer.from_file(demo_dir)
    a = tokenizer.encode("The quick brown fox jumps over the lazy dog")
    b = tokenizer.encode("A slow green turtle walks under the lazy dog")
    assert a[-2:] == b[-2:]  # same last tokens, different context
    meta = ForwardMetadata.fresh([len(a), len(b)], DEMO_ARGS.window, torch.device("cpu"))
    logits = model(torch.tensor(a + b), meta)
    assert torch.isfinite(logits).all()
    last_a, last_b = logits[len(a) - 1], logits[-1]
    assert last_a.std() > 0.5  # a peaked distribution, not near-uniform noise
    assert (last_a - last_b).abs().max() > 0.5  # the context changes the prediction
    assert logits[: len(a)].argmax(-1).unique().numel() > 1
