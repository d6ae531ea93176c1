"""Typed errors of the inference engine."""


class EngineError(Exception):
    """Base class for errors raised by the model package."""


class CheckpointError(EngineError):
    """A checkpoint folder is missing files, keys, or has wrong shapes or dtypes."""


class TokenizerError(EngineError):
    """A tokenizer file is missing or a chat conversation is malformed."""


class RequestError(EngineError):
    """A request to the engine is invalid (too long, empty, bad sampling parameters)."""


class MemoryBudgetError(EngineError):
    """The weights and at least two cache slots do not fit the memory budget."""


class SamplingError(EngineError):
    """One sequence's next token could not be sampled (non-finite logits, a failing sampler);
    that sequence ends with finish_reason "error", the others of its step go on."""
