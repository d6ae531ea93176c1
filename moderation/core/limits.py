"""What planning needs to know of the model: how many tokens a prompt may take.

The server's front process plans requests (validates them, splits long texts) without the
weights, so it gets these limits from the model process; in-process they come from the engine.
Either way they are the same values, read from the engine's public attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model import Engine

LONG_TEXT_MODES = ("reject", "split")
"""What to do with a text longer than a prompt may take: reject it, or split it into windows."""

DEFAULT_MAX_CONTEXT = 8192
"""Tokens per sequence unless the operator says otherwise: room for any classification prompt
and a long chat, at 1 GiB of cache per slot for the 7B (vLLM's max_model_len plays this part).
Here, not in `runtime`, so that the command-line options are built without torch."""

DTYPES = ("auto", "bfloat16", "float16", "float32")
"""The dtypes a model may be loaded in (`auto`: what the device does best)."""

PLANNING_CONTEXT_CAP = 8192
"""Without a context limit of the engine, prompts are planned for at most this many tokens."""


@dataclass(frozen=True)
class ModelLimits:
    """The context limits of a loaded model, as its engine enforces them."""

    window: int  # the sliding window (the context length when the model has none)
    max_context: int | None  # the engine's context limit; None = the model's max_seq_len
    max_seq_len: int  # the model's own longest sequence
    attention_backend: str  # what GetModelInfo reports, as the fields below
    cpu_gemm: str = ""  # the CPU kernel choice (model/cpu_gemm.py); empty on a GPU
    cpu_gemm_measure_seconds: float = 0.0
    generation_slots: int = 0
    scoring_slots: int = 0
    kv_cache_bytes: int = 0
    # Decode steps as captured graphs (model/graphs.py): their batch buckets (empty: eager) and
    # the start-up seconds their compile and capture took (GetModelInfo reports both).
    graph_batch_sizes: tuple[int, ...] = ()
    graph_capture_seconds: float = 0.0

    @classmethod
    def of(cls, engine: Engine) -> ModelLimits:
        gemm = engine.cpu_gemm
        return cls(
            window=engine.window,
            max_context=engine.max_context,
            max_seq_len=engine.args.max_seq_len,
            attention_backend=engine.backend.name,
            cpu_gemm=gemm.describe() if gemm is not None else "",
            cpu_gemm_measure_seconds=gemm.measure_seconds if gemm is not None else 0.0,
            generation_slots=engine.memory.generation_slots,
            scoring_slots=engine.memory.scoring_slots,
            kv_cache_bytes=engine.memory.cache_bytes,
            graph_batch_sizes=engine.graph_batch_sizes,
            graph_capture_seconds=engine.graph_capture_seconds or 0.0,
        )

    @property
    def context(self) -> int:
        """The longest sequence the engine takes."""
        return self.max_context or self.max_seq_len

    @property
    def planning_context(self) -> int:
        """Tokens a classification prompt may use (prefix, text and label)."""
        return self.max_context or min(self.max_seq_len, PLANNING_CONTEXT_CAP)
