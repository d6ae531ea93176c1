"""Loading what every entry point needs: model, tokenizer, engine, classifier, generator."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch

from model import Engine, Tokenizer, load_model
from model.demo import is_demo_checkpoint, write_demo_checkpoint
from moderation.classifier import Classifier
from moderation.guarded import GuardedGenerator
from moderation.policy import DEFAULT_POLICY, Policy, load_policy_file

DEMO_MODEL_ID = "demo-tiny-random-mistral (random weights: decisions are meaningless)"

log = structlog.get_logger(__name__)


@dataclass
class Runtime:
    model_id: str
    demo: bool
    device: str
    dtype: str
    engine: Engine
    tokenizer: Tokenizer
    classifier: Classifier
    generator: GuardedGenerator


def demo_checkpoint_dir() -> Path:
    """Where the demo checkpoint is written: the temp dir, the one writable place in the
    container (read-only root filesystem)."""
    folder = Path(tempfile.gettempdir()) / "moderation-demo-model"
    if not is_demo_checkpoint(folder):
        write_demo_checkpoint(folder)
    return folder


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 is what the model was trained in; CPUs are fastest and exact in fp32.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]


def load_runtime(
    model_dir: str | Path | None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    attention_backend: str = "auto",
    policy_files: Sequence[str | Path] = (),
    default_policy: str = DEFAULT_POLICY,
    threshold: float = 0.5,
    long_text: str = "reject",
    max_text_tokens: int | None = None,
    max_batch_size: int = 8,
    score_batch_size: int = 16,
    max_new_tokens_limit: int = 4096,
) -> Runtime:
    """Load a checkpoint folder (either layout), or the demo checkpoint when model_dir is None."""
    demo = model_dir is None
    folder = demo_checkpoint_dir() if model_dir is None else Path(model_dir)
    demo = demo or is_demo_checkpoint(folder)
    model_id = DEMO_MODEL_ID if demo else folder.resolve().name
    if demo:
        log.warning("serving the demo model", model=model_id, path=str(folder))
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    policies = load_policies(policy_files)  # a bad policy file fails before a long model load
    transformer = load_model(folder, device=str(dev), dtype=dt)
    tokenizer = Tokenizer.from_file(folder)
    engine = Engine(
        transformer,
        max_batch_size=max_batch_size,
        score_batch_size=score_batch_size,
        backend=attention_backend,
        eos_id=tokenizer.eos_id,
    )
    return assemble_runtime(
        engine,
        tokenizer,
        model_id=model_id,
        demo=demo,
        device=str(dev),
        dtype=str(dt).removeprefix("torch."),
        policies=policies,
        default_policy=default_policy,
        threshold=threshold,
        long_text=long_text,
        max_text_tokens=max_text_tokens,
        max_new_tokens_limit=max_new_tokens_limit,
    )


def load_policies(paths: Sequence[str | Path]) -> dict[str, Policy]:
    """Custom policy files by policy name."""
    policies: dict[str, Policy] = {}
    for path in paths:
        policy = load_policy_file(path)
        policies[policy.name] = policy
    return policies


def assemble_runtime(
    engine: Any,
    tokenizer: Tokenizer,
    *,
    model_id: str,
    demo: bool,
    device: str,
    dtype: str,
    policies: Mapping[str, Policy] | None = None,
    default_policy: str = DEFAULT_POLICY,
    threshold: float = 0.5,
    long_text: str = "reject",
    max_text_tokens: int | None = None,
    max_new_tokens_limit: int = 4096,
) -> Runtime:
    """Policies, classifier and generator around an engine: the loaded one, or (in the server
    process, when the model runs in its own) a description of its limits, for planning."""
    classifier = Classifier(
        engine,
        tokenizer,
        model_id=model_id,
        policies=policies,
        default_policy=default_policy,
        threshold=threshold,
        long_text=long_text,
        max_text_tokens=max_text_tokens,
    )
    generator = GuardedGenerator(
        engine, tokenizer, classifier, model_id=model_id, max_new_tokens_limit=max_new_tokens_limit
    )
    return Runtime(
        model_id=model_id,
        demo=demo,
        device=device,
        dtype=dtype,
        engine=engine,
        tokenizer=tokenizer,
        classifier=classifier,
        generator=generator,
    )
