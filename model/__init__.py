"""Mistral 7B inference engine: transformer, rolling cache, attention backends, batched engine.

Importing it needs torch alone: the tokenizer (sentencepiece) and checkpoint reading
(safetensors) are imported on first use of `Tokenizer`, `load_checkpoint` or `load_model`, so
the engine runs (and bench/gpu_check.sh measures it) on an image with nothing but torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from model.args import ModelArgs
from model.cache import RollingCache
from model.engine import Engine
from model.errors import (
    CheckpointError,
    EngineError,
    MemoryBudgetError,
    RequestError,
    SamplingError,
    TokenizerError,
)
from model.generation import GenerationRequest, TokenEvent
from model.memory import MemoryPlan
from model.sampling import SamplingParams
from model.scoring import Prefix, ScoreRequest
from model.stream_checks import StreamCheck
from model.transformer import Transformer

if TYPE_CHECKING:
    from model.tokenizer import Tokenizer
    from model.weights import load_checkpoint, load_model

# Name -> the module that defines it, imported when the name is first read.
_LAZY = {
    "Tokenizer": "model.tokenizer",
    "load_checkpoint": "model.weights",
    "load_model": "model.weights",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "Engine",
    "EngineError",
    "GenerationRequest",
    "MemoryBudgetError",
    "MemoryPlan",
    "ModelArgs",
    "Prefix",
    "RequestError",
    "RollingCache",
    "SamplingError",
    "SamplingParams",
    "ScoreRequest",
    "StreamCheck",
    "TokenEvent",
    "Tokenizer",
    "TokenizerError",
    "Transformer",
    "load_checkpoint",
    "load_model",
]
