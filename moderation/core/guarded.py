"""Guarded generation: the paper's guardrail system prompt, with optional input and output
moderation around the model's answer (paper, section 5).

`AnswerDecoder` is the one token loop: the engine's token events of one generation in, the text
that may be sent now out. The in-process generator (`GuardedGenerator.stream`, the CLI) and the
server's scheduler both decode through it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from model import Engine, GenerationRequest, SamplingError, SamplingParams, TokenEvent, Tokenizer
from moderation.core.classifier import Classifier
from moderation.core.decision import Classification
from moderation.core.generation import (
    INPUT_REFUSAL,
    OUTPUT_REFUSAL,
    GenerateOptions,
    GenerationResult,
    PreparedGeneration,
    closing_events,
)
from moderation.core.text_safety import is_blank


class TextStream:
    """Incremental detokenization: feed token ids, get the text they add.

    Holds back text ending in an incomplete UTF-8 sequence (sentencepiece byte tokens decode
    to U+FFFD until the character is complete).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.sent = 0

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):
            return ""
        delta = text[self.sent :]
        self.sent = len(text)
        return delta

    def text(self) -> str:
        return self.tokenizer.decode(self.tokens)


class AnswerDecoder:
    """One generation's token events -> the text deltas that may be sent now.

    Nothing is released while output moderation is on (the answer goes out whole once checked,
    see `closing_events`), nor when the caller wants only the result (`stream=False`).
    """

    def __init__(self, tokenizer: Tokenizer, prep: PreparedGeneration, *, stream: bool = True):
        self.eos = tokenizer.eos_id
        self.text = TextStream(tokenizer)
        self.release = stream and not prep.options.moderate_output
        self.tokens: list[int] = []  # every token generated, the end-of-sequence one included
        self.finish_reason: str | None = None  # set by the last event
        # Why the engine ended this generation without a token (finish_reason "error").
        self.error: str | None = None

    def push(self, event: TokenEvent) -> str:
        if event.error is not None:  # no token: the engine could not sample one
            self.finish_reason, self.error = "error", event.error
            return ""
        self.tokens.append(event.token)
        delta = ""
        if not (event.finish_reason == "stop" and event.token == self.eos):
            delta = self.text.push(event.token)
        if event.finished:
            self.finish_reason = event.finish_reason or "length"
        return delta if self.release else ""

    @property
    def answer(self) -> str:
        return self.text.text()


class GuardedGenerator:
    """Chat generation wrapped in the guardrail prompt and optional moderation."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        classifier: Classifier,
        *,
        model_id: str,
        input_refusal: str = INPUT_REFUSAL,
        output_refusal: str = OUTPUT_REFUSAL,
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.classifier = classifier
        self.model_id = model_id
        self.input_refusal = input_refusal
        self.output_refusal = output_refusal

    def prepare(
        self, messages: Sequence[Mapping[str, Any]], options: GenerateOptions
    ) -> PreparedGeneration:
        """Validate and build the prompt (the classifier's planner); InvalidArgument names the
        bad field."""
        return self.classifier.planner.prepare(messages, options)

    def request(self, prep: PreparedGeneration) -> GenerationRequest:
        o = prep.options
        return GenerationRequest(
            prep.prompt, o.max_new_tokens, SamplingParams(o.temperature, o.top_p, o.seed)
        )

    def refuse_input(
        self, prep: PreparedGeneration, moderation: Classification
    ) -> GenerationResult:
        return GenerationResult(
            text="",
            refused=True,
            refusal=self.input_refusal,
            finish_reason="input_flagged",
            input_moderation=moderation,
            output_moderation=None,
            prompt_tokens=len(prep.prompt),
            completion_tokens=0,
            model=self.model_id,
        )

    def finish(
        self,
        prep: PreparedGeneration,
        tokens: Sequence[int],
        finish_reason: str,
        input_moderation: Classification | None,
        output_moderation: Classification | None = None,
    ) -> GenerationResult:
        """Assemble the result, running output moderation on the answer when asked (unless the
        caller already ran it, batched with other work, and passes `output_moderation`)."""
        answer_tokens = [t for t in tokens if t != self.tokenizer.eos_id]
        answer = self.tokenizer.decode(answer_tokens)
        # An empty answer has nothing to withhold; the classifier refuses empty text.
        if output_moderation is None and prep.options.moderate_output and not is_blank(answer):
            output_moderation = self.classifier.classify_many([prep.output_item(answer)])[0]
        withheld = output_moderation is not None and output_moderation.flagged
        return GenerationResult(
            text="" if withheld else answer,
            refused=withheld,
            refusal=self.output_refusal if withheld else "",
            finish_reason="output_flagged" if withheld else finish_reason,
            input_moderation=input_moderation,
            output_moderation=output_moderation,
            prompt_tokens=len(prep.prompt),
            completion_tokens=len(tokens),
            model=self.model_id,
        )

    def moderate_input(self, prep: PreparedGeneration) -> Classification | None:
        if prep.input_item is None:
            return None
        return self.classifier.classify_many([prep.input_item])[0]

    def stream(
        self, messages: Sequence[Mapping[str, Any]], options: GenerateOptions
    ) -> Iterator[str | GenerationResult]:
        """Text deltas, then the result. With output moderation on, no text is yielded before
        the whole answer has been checked."""
        engine = self.engine
        prep = self.prepare(messages, options)
        input_moderation = self.moderate_input(prep)
        if input_moderation is not None and input_moderation.flagged:
            yield self.refuse_input(prep, input_moderation)
            return
        request_id = engine.add_request(self.request(prep))
        decoder = AnswerDecoder(self.tokenizer, prep)
        try:
            while decoder.finish_reason is None:
                for event in engine.step():
                    if event.request_id == request_id and (delta := decoder.push(event)):
                        yield delta
        finally:
            engine.cancel(request_id)
        if decoder.error is not None:
            raise SamplingError(f"generation failed: {decoder.error}")
        result = self.finish(prep, decoder.tokens, decoder.finish_reason, input_moderation)
        yield from closing_events(prep, result)

    def generate(
        self, messages: Sequence[Mapping[str, Any]], options: GenerateOptions | None = None
    ) -> GenerationResult:
        """Generate one guarded answer in-process (the service batches through its worker)."""
        result: GenerationResult | None = None
        for item in self.stream(messages, options or GenerateOptions()):
            if isinstance(item, GenerationResult):
                result = item
        assert result is not None
        return result
