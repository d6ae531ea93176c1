"""Mistral 7B inference engine: transformer, rolling cache, attention backends, batched engine."""

from model.args import ModelArgs
from model.cache import RollingCache
from model.engine import Engine, GenerationRequest, TokenEvent
from model.errors import (
    CheckpointError,
    EngineError,
    MemoryBudgetError,
    RequestError,
    SamplingError,
    TokenizerError,
)
from model.memory import MemoryPlan
from model.sampling import SamplingParams
from model.scoring import Prefix, ScoreRequest
from model.stream_checks import StreamCheck
from model.tokenizer import Tokenizer
from model.transformer import Transformer
from model.weights import load_checkpoint, load_model

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
