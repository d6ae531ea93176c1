"""Guarded generation: the paper's guardrail system prompt, with optional input and output
moderation around the model's answer (paper, section 5)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from model import Engine, GenerationRequest, SamplingParams, Tokenizer
from model.errors import RequestError, TokenizerError
from moderation.classifier import Classification, ClassificationError, Classifier, ClassifyItem
from moderation.policy import GUARDRAIL_SYSTEM_PROMPT, Role
from moderation.prompts import PromptError, guarded_messages

INPUT_REFUSAL = "I'm sorry, but I can't help with that request."
OUTPUT_REFUSAL = "I'm sorry, but I can't share that answer."


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


@dataclass(frozen=True)
class PreparedGeneration:
    """A validated generation: the prompt tokens and what moderation to run around it."""

    options: GenerateOptions
    prompt: list[int]
    user_prompt: str  # the last user message, what input moderation classifies
    input_item: ClassifyItem | None

    def output_item(self, answer: str) -> ClassifyItem:
        return ClassifyItem(
            answer,
            role=Role.OUTPUT,
            user_prompt=self.user_prompt,
            policy=self.options.policy,
            threshold=self.options.threshold,
        )


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


class GuardedGenerator:
    """Chat generation wrapped in the guardrail prompt and optional moderation."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        classifier: Classifier,
        *,
        model_id: str,
        max_new_tokens_limit: int = 4096,
        input_refusal: str = INPUT_REFUSAL,
        output_refusal: str = OUTPUT_REFUSAL,
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.classifier = classifier
        self.model_id = model_id
        self.max_new_tokens_limit = max_new_tokens_limit
        self.input_refusal = input_refusal
        self.output_refusal = output_refusal

    def prepare(
        self, messages: Sequence[Mapping[str, Any]], options: GenerateOptions
    ) -> PreparedGeneration:
        """Validate and build the prompt; ClassificationError names the bad field."""
        if not 1 <= options.max_new_tokens <= self.max_new_tokens_limit:
            raise ClassificationError(
                "max_new_tokens", f"must be between 1 and {self.max_new_tokens_limit}"
            )
        try:
            SamplingParams(options.temperature, options.top_p, options.seed)
        except RequestError as exc:
            raise ClassificationError(
                "temperature" if "temperature" in str(exc) else "top_p", str(exc)
            ) from exc
        system = None
        if options.guardrail:
            system = options.system_prompt or GUARDRAIL_SYSTEM_PROMPT
        elif options.system_prompt:
            system = options.system_prompt
        try:
            conversation = guarded_messages(messages, system_prompt=system)
            prompt = self.tokenizer.encode_chat(conversation)
        except (PromptError, TokenizerError) as exc:
            raise ClassificationError("messages", str(exc)) from exc
        if conversation[-1]["role"] != "user":
            raise ClassificationError("messages", "the conversation must end with a user message")
        user_prompt = str(conversation[-1]["content"])
        input_item = None
        if options.moderate_input:
            input_item = ClassifyItem(
                user_prompt, role=Role.INPUT, policy=options.policy, threshold=options.threshold
            )
            self.classifier.plan(input_item)  # validate now: policy, threshold, length
        elif options.policy is not None or options.threshold is not None:
            # Validate policy and threshold even when only output moderation uses them.
            self.classifier.plan(
                ClassifyItem("x", policy=options.policy, threshold=options.threshold)
            )
        return PreparedGeneration(options, prompt, user_prompt, input_item)

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
        if output_moderation is None and prep.options.moderate_output and answer.strip():
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
        prep = self.prepare(messages, options)
        input_moderation = self.moderate_input(prep)
        if input_moderation is not None and input_moderation.flagged:
            yield self.refuse_input(prep, input_moderation)
            return
        request_id = self.engine.add_request(self.request(prep))
        text = TextStream(self.tokenizer)
        reason = "length"
        try:
            while True:
                events = [e for e in self.engine.step() if e.request_id == request_id]
                if not events:
                    continue
                event = events[0]
                if event.finish_reason != "stop" or event.token != self.tokenizer.eos_id:
                    delta = text.push(event.token)
                    if delta and not options.moderate_output:
                        yield delta
                else:
                    text.tokens.append(event.token)
                if event.finished:
                    reason = event.finish_reason or "length"
                    break
        finally:
            self.engine.cancel(request_id)
        result = self.finish(prep, text.tokens, reason, input_moderation)
        if options.moderate_output and result.text:
            yield result.text
        yield result

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
