"""Guarded generation's data: options, a prepared (validated) generation and its result.
Plain data, no model: the API converts to and from these."""

from __future__ import annotations

from dataclasses import dataclass

from moderation.core.decision import Classification, ClassifyItem, PlannedItem
from moderation.core.policy import Role

INPUT_REFUSAL = "I'm sorry, but I can't help with that request."
OUTPUT_REFUSAL = "I'm sorry, but I can't share that answer."

# With moderate_output the answer is checked every this many generated tokens (the server's
# default; a request may ask for its own, up to the maximum).
DEFAULT_STREAM_CHECK_TOKENS = 16
MAX_STREAM_CHECK_TOKENS = 4096


@dataclass(frozen=True)
class GenerateOptions:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    guardrail: bool = True  # prepend the paper's guardrail system prompt
    system_prompt: str | None = None  # replaces the guardrail prompt when set
    moderate_input: bool = False  # refuse without generating when the user prompt is flagged
    moderate_output: bool = False  # withhold a flagged answer
    policy: str | None = None
    threshold: float | None = None
    # moderate_output: check the answer every this many tokens; None = the server's default
    # (a prepared generation always has it set).
    stream_check_tokens: int | None = None


@dataclass(frozen=True)
class GenerationResult:
    text: str  # the answer; empty when refused
    refused: bool
    refusal: str  # the message to show instead, when refused
    finish_reason: str  # "stop", "length", "input_flagged" or "output_flagged"
    input_moderation: Classification | None
    output_moderation: Classification | None
    prompt_tokens: int
    completion_tokens: int
    model: str
    # Tokens released to the caller before the end: with the answer flagged by a check, those
    # the earlier checks found acceptable; otherwise completion_tokens.
    released_tokens: int = 0


@dataclass(frozen=True)
class PreparedGeneration:
    """A validated generation: the prompt tokens and what moderation to run around it."""

    options: GenerateOptions
    prompt: list[int]
    user_prompt: str  # the last user message, what input moderation classifies
    input_planned: PlannedItem | None  # with moderate_input: the user prompt's planned item

    def output_item(self, answer: str) -> ClassifyItem:
        return ClassifyItem(
            answer,
            role=Role.OUTPUT,
            user_prompt=self.user_prompt,
            policy=self.options.policy,
            threshold=self.options.threshold,
        )


def closing_events(
    prep: PreparedGeneration, result: GenerationResult, *, progressive: bool = False
) -> list[str | GenerationResult]:
    """The last events of a generation. With output moderation on and no progressive checks
    (`progressive`: the answer was released chunk by chunk as checks passed), nothing was sent
    before the answer was checked, so a released answer goes out whole, as one delta, before
    the result."""
    if prep.options.moderate_output and result.text and not progressive:
        return [result.text, result]
    return [result]
