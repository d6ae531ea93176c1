"""The in-process composition: model, tokenizer, policies, classifier and generator.

Both serving and the jobs build their runtime here, from `RuntimeSettings`. The server's front
process, where the model runs in a process of its own, needs only `make_planner` (the same
planning from the same settings, with the limits the model process reports) and the model's
`ModelDescription`.
"""

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
from model.memory import DEFAULT_GPU_MEMORY_UTILIZATION
from moderation.core.builtin_policies import BUILTIN_POLICIES, DEFAULT_POLICY
from moderation.core.classifier import Classifier
from moderation.core.cpus import available_cpus
from moderation.core.generation import DEFAULT_STREAM_CHECK_TOKENS
from moderation.core.guarded import GuardedGenerator
from moderation.core.limits import DEFAULT_MAX_CONTEXT, ModelLimits
from moderation.core.limits import DTYPES as DTYPES  # where the server's settings look for it
from moderation.core.planning import Planner, check_warm_policies
from moderation.core.policy import Policy, PolicyError, load_policy_file
from moderation.core.thresholds import check_operating_point, load_operating_points

DEMO_MODEL_ID = "demo-tiny-random-mistral (random weights: decisions are meaningless)"
ATTENTION_BACKENDS = ("auto", "flash", "flex", "sdpa")

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RuntimeSettings:
    """What a runtime is built from; the server's settings and the jobs' options map onto it.
    A field named as a server setting is that setting (`ServeSettings.runtime_settings`)."""

    model: str | None = None  # checkpoint folder; None = the demo model
    device: str = "auto"
    dtype: str = "auto"
    attention_backend: str = "auto"
    policy_files: tuple[str, ...] = ()
    thresholds: tuple[str, ...] = ()  # operating points by policy (core.thresholds)
    policy: str = DEFAULT_POLICY
    # Pre-filled at a server's start-up besides the ones it names (Planner.start_up_policies).
    warm_policies: tuple[str, ...] = ()
    threshold: float = 0.5
    long_text: str = "reject"
    max_text_tokens: int | None = None
    # Generation slots asked for (fewer when the memory budget is short; "auto": sized from it
    # on CUDA, 32 elsewhere).
    max_batch_size: int | str = 8
    score_batch_size: int | str = 16  # scoring slots asked for, likewise
    max_new_tokens: int = 4096
    stream_check_tokens: int = DEFAULT_STREAM_CHECK_TOKENS  # moderate_output: check every N tokens
    # The longest sequence served. For a model without a sliding window (v0.2/v0.3) it is also
    # the cache rows per slot: sized from the model's 32k instead, one slot costs 4 GiB (7B).
    max_context: int | None = DEFAULT_MAX_CONTEXT
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    cache_memory: int | None = None  # CPU: the cache's budget (None = auto); CUDA: a cap
    # Decode steps as CUDA graphs where they pay (CUDA; CPU runs eager); False: eager.
    compile: bool = True


@dataclass(frozen=True)
class ModelDescription:
    """What is known of a loaded model without its weights (what GetModelInfo reports)."""

    model_id: str
    demo: bool
    device: str
    dtype: str
    limits: ModelLimits


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

    @property
    def planner(self) -> Planner:
        return self.classifier.planner

    @property
    def description(self) -> ModelDescription:
        limits = ModelLimits.of(self.engine)
        return ModelDescription(self.model_id, self.demo, self.device, self.dtype, limits)


def demo_checkpoint_dir() -> Path:
    """Where the demo checkpoint is written: the temp dir, the one writable place in the
    container (read-only root filesystem)."""
    folder = Path(tempfile.gettempdir()) / "moderation-demo-model"
    if not is_demo_checkpoint(folder):
        write_demo_checkpoint(folder)
    return folder


def checkpoint_dir(settings: RuntimeSettings) -> Path:
    """The checkpoint folder these settings load (the demo checkpoint without a model)."""
    return demo_checkpoint_dir() if settings.model is None else Path(settings.model)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def weights_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The dtype to load weights in: "auto" picks by device."""
    if dtype == "auto":
        # bf16 is what the model was trained in; CPUs are fastest and exact in fp32.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]


def load(settings: RuntimeSettings) -> Runtime:
    """Load a checkpoint folder (either layout), or the demo checkpoint without a model."""
    folder = checkpoint_dir(settings)
    demo = settings.model is None or is_demo_checkpoint(folder)
    model_id = DEMO_MODEL_ID if demo else folder.resolve().name
    if demo:
        # Neutral wording: the jobs load it too, and they serve nothing.
        log.warning("using the demo model", model=model_id, path=str(folder))
    dev = resolve_device(settings.device)
    dt = weights_dtype(settings.dtype, dev)
    policies = load_policies(settings.policy_files)  # a bad policy file fails before the load
    load_operating_points(settings.thresholds)  # so does a bad thresholds file
    transformer = load_model(folder, device=str(dev), dtype=dt)
    tokenizer = Tokenizer.from_file(folder)
    engine = Engine(
        transformer,
        max_batch_size=settings.max_batch_size,
        score_batch_size=settings.score_batch_size,
        backend=settings.attention_backend,
        eos_id=tokenizer.eos_id,
        max_context=settings.max_context,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        cache_memory_bytes=settings.cache_memory,
        # On: the engine's default (graphs on CUDA, eager on CPU, no warning); off: eager.
        compile=None if settings.compile else False,
    )
    return assemble_runtime(
        engine,
        tokenizer,
        settings,
        model_id=model_id,
        demo=demo,
        device=str(dev),
        dtype=str(dt).removeprefix("torch."),
        policies=policies,
    )


def set_torch_threads(threads: int = 0) -> int:
    """Torch's intra-op threads for this process: `threads`, or 0 for the CPUs the container
    may use (its cgroup CPU quota and affinity, not the host's cores); returns the count."""
    count = threads or available_cpus()
    torch.set_num_threads(count)
    return count


def load_runtime(
    model_dir: str | Path | None, *, policy_files: Sequence[str | Path] = (), **options: Any
) -> Runtime:
    """`load` with the settings as keywords (the other fields of RuntimeSettings)."""
    return load(
        RuntimeSettings(
            model=None if model_dir is None else str(model_dir),
            policy_files=tuple(str(p) for p in policy_files),
            **options,
        )
    )


def check_policies(settings: RuntimeSettings) -> None:
    """PolicyError (ThresholdsError) unless the policy files, the default policy and the
    thresholds files are valid together: what a model load would find, without the load."""
    policies = {**BUILTIN_POLICIES, **load_policies(settings.policy_files)}
    if settings.policy not in policies:
        raise PolicyError(
            f"unknown policy {settings.policy!r}; known: {', '.join(sorted(policies))} "
            "(custom policies come from the policy files)"
        )
    for point in load_operating_points(settings.thresholds).values():
        check_operating_point(point, policies)
    check_warm_policies(settings.warm_policies, policies)


def load_policies(paths: Sequence[str | Path]) -> dict[str, Policy]:
    """Custom policy files by policy name."""
    policies: dict[str, Policy] = {}
    for path in paths:
        policy = load_policy_file(path)
        policies[policy.name] = policy
    return policies


def make_planner(
    tokenizer: Tokenizer,
    limits: ModelLimits,
    settings: RuntimeSettings,
    policies: Mapping[str, Policy] | None = None,
) -> Planner:
    """The planning these settings ask for, with a model's limits."""
    return Planner(
        tokenizer,
        limits,
        policies=policies,
        default_policy=settings.policy,
        threshold=settings.threshold,
        long_text=settings.long_text,
        max_text_tokens=settings.max_text_tokens,
        max_new_tokens_limit=settings.max_new_tokens,
        stream_check_tokens=settings.stream_check_tokens,
        operating_points=load_operating_points(settings.thresholds),
        warm_policies=settings.warm_policies,
    )


def assemble_runtime(
    engine: Engine,
    tokenizer: Tokenizer,
    settings: RuntimeSettings,
    *,
    model_id: str,
    demo: bool,
    device: str,
    dtype: str,
    policies: Mapping[str, Policy] | None = None,
) -> Runtime:
    """Policies, planner, classifier and generator around a loaded engine."""
    planner = make_planner(tokenizer, ModelLimits.of(engine), settings, policies)
    classifier = Classifier(engine, tokenizer, planner, model_id=model_id)
    generator = GuardedGenerator(engine, tokenizer, classifier, model_id=model_id)
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
