"""Guarded generation: the paper's guardrail system prompt, with optional input and output
moderation around the model's answer (paper, section 5).

`AnswerDecoder` is the one token loop: the engine's token events of one generation in, the text
that may be sent now out. The in-process generator (`GuardedGenerator.stream`, the CLI) and the
server's scheduler both decode through it.

Output moderation is progressive: every `stream_check_tokens` generated tokens the answer so
far is classified (an `OutputStream`: each check costs the new tokens, not the answer so far),
and only the tokens a check found acceptable are released. A flagging check stops the
generation; nothing after it is released.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from model import (
    Engine,
    GenerationRequest,
    SamplingError,
    SamplingParams,
    StreamCheck,
    TokenEvent,
    Tokenizer,
)
from moderation.core.chat import ChatMessage
from moderation.core.classifier import Classifier, OutputStream
from moderation.core.decision import Classification
from moderation.core.generation import (
    DEFAULT_STREAM_CHECK_TOKENS,
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

    With output moderation on, `push` releases nothing: with `checks` (progressive moderation)
    the text of the tokens each acceptable check covered is released by `checked`; without,
    the answer goes out whole once checked at the end (see `closing_events`). Nothing is
    released when the caller wants only the result (`stream=False`).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prep: PreparedGeneration,
        *,
        stream: bool = True,
        checks: OutputStream | None = None,
    ):
        self.eos = tokenizer.eos_id
        self.text = TextStream(tokenizer)
        self.stream = stream
        self.release = stream and not prep.options.moderate_output
        self.tokens: list[int] = []  # every token generated, the end-of-sequence one included
        self.finish_reason: str | None = None  # set by the last event
        self.checks = checks
        self.every = prep.options.stream_check_tokens or DEFAULT_STREAM_CHECK_TOKENS
        self.released = TextStream(tokenizer)  # the text of the checked, acceptable tokens
        self.last_check: Classification | None = None
        # Why the engine ended this generation without a token (finish_reason "error").
        self.error: str | None = None

    def push(self, event: TokenEvent) -> str:
        if self.flagged:
            # With checks riding in a step's pass (GuardedGenerator.step), the step whose check
            # flags the answer has generated one more token: it is dropped, as if generation
            # had stopped at the flag.
            return ""
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

    @property
    def answer_tokens(self) -> list[int]:
        """The answer's tokens: what was generated, less the end-of-sequence token."""
        return self.text.tokens

    @property
    def flagged(self) -> bool:
        return self.last_check is not None and self.last_check.flagged

    @property
    def released_tokens(self) -> int:
        """Answer tokens covered by acceptable checks (their text was released)."""
        return len(self.released.tokens)

    def check_due(self) -> bool:
        """Whether the answer needs a check now: `every` unchecked tokens, or the tail once
        generation has finished."""
        if self.checks is None or self.flagged or self.error is not None:
            return False
        unchecked = len(self.answer_tokens) - len(self.checks.checked)
        return unchecked >= self.every or (self.finish_reason is not None and unchecked > 0)

    def unchecked(self) -> list[int]:
        """The answer tokens the next check covers."""
        assert self.checks is not None
        return self.answer_tokens[len(self.checks.checked) :]

    def checked(self, result: Classification) -> str:
        """A check covering the answer up to `checks.checked` came back: the text of its tokens
        to release now (none when it flagged the answer). A character whose bytes the check
        split is held back until the next check covers the rest."""
        assert self.checks is not None
        self.last_check = result
        if result.flagged:
            return ""
        covered = self.answer_tokens[self.released_tokens : len(self.checks.checked)]
        delta = "".join(self.released.push(t) for t in covered)
        return delta if self.stream else ""

    @property
    def done(self) -> bool:
        """Nothing more to generate or check: finished and checked, or flagged."""
        return self.flagged or (self.finish_reason is not None and not self.check_due())


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
        self, messages: Sequence[ChatMessage], options: GenerateOptions
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
        *,
        released_tokens: int = 0,
    ) -> GenerationResult:
        """Assemble the result, running output moderation on the answer when asked (unless the
        caller already ran it, batched with other work or check by check, and passes
        `output_moderation`). `released_tokens`: the tokens released before a flagging check
        (when the answer is withheld)."""
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
            released_tokens=released_tokens if withheld else len(tokens),
        )

    def finish_decoded(
        self,
        prep: PreparedGeneration,
        decoder: AnswerDecoder,
        input_moderation: Classification | None,
        output_moderation: Classification | None = None,
    ) -> list[str | GenerationResult]:
        """The closing events of a decoded generation: its result (and, when the answer was
        checked only at the end, the answer as one delta before it)."""
        if decoder.checks is not None:
            output_moderation = decoder.last_check
        result = self.finish(
            prep,
            decoder.tokens,
            decoder.finish_reason or "length",
            input_moderation,
            output_moderation,
            released_tokens=decoder.released_tokens,
        )
        return closing_events(prep, result, progressive=decoder.checks is not None)

    def open_checks(self, prep: PreparedGeneration) -> OutputStream | None:
        """Progressive output moderation for this generation, when it asks for output
        moderation and the engine can hold its check (see Classifier.open_output_stream)."""
        if not prep.options.moderate_output or self.engine.max_batch_size < 2:
            return None  # one generation slot: the answer's sequence needs it
        return self.classifier.open_output_stream(prep)

    def close_checks(self, decoder: AnswerDecoder) -> None:
        if decoder.checks is not None:
            self.classifier.close_output_stream(decoder.checks)

    def run_checks(self, decoders: Sequence[AnswerDecoder]) -> list[str]:
        """One check for each decoder (those whose `check_due`), in one engine pass: the text
        each releases."""
        pairs = [(d.checks, d.unchecked()) for d in decoders if d.checks is not None]
        results = self.classifier.check_outputs(pairs)
        return [d.checked(r) for d, r in zip(decoders, results, strict=True)]

    def step(self, decoders: Sequence[AnswerDecoder]) -> tuple[list[TokenEvent], list[str]]:
        """One engine step, with the check of each decoder in `decoders` (those whose
        `check_due`) riding in the step's forward pass (`Engine.step_with_checks`): the
        weights are read once for both. Returns the step's token events and the text each
        decoder's check releases.

        A check covers the tokens generated before this step, so the text it releases was
        checked; push the events after them: a flagged answer takes no token from the step it
        was flagged in (AnswerDecoder.push)."""
        events, deltas, _ = self.step_with(decoders)
        return events, deltas

    def step_with(
        self,
        decoders: Sequence[AnswerDecoder],
        answers: Sequence[tuple[OutputStream, Sequence[int]]] = (),
    ) -> tuple[list[TokenEvent], list[str], list[Classification]]:
        """`step`, with the checks of `answers` (streams of answers this server did not
        generate, and their new tokens: ModerateStream) riding in the same pass: the step's
        events, the text each decoder's check releases, each answer's classification."""
        pairs: list[tuple[OutputStream, Sequence[int]]] = [
            (d.checks, d.unchecked()) for d in decoders if d.checks is not None
        ]
        pairs += answers
        if not pairs:
            return self.engine.step(), [], []
        events: list[TokenEvent] = []

        def run(requests: list[StreamCheck]) -> list[list[float]]:
            stepped, scores = self.engine.step_with_checks(requests, relative=True)
            events.extend(stepped)
            return scores

        results = self.classifier.check_outputs(pairs, run=run)
        n = len(decoders)
        deltas = [d.checked(r) for d, r in zip(decoders, results[:n], strict=True)]
        return events, deltas, results[n:]

    def moderate_input(self, prep: PreparedGeneration) -> Classification | None:
        if prep.input_planned is None:
            return None
        return self.classifier.run([prep.input_planned])[0]

    def stream(
        self, messages: Sequence[ChatMessage], options: GenerateOptions
    ) -> Iterator[str | GenerationResult]:
        """Text deltas, then the result. With output moderation on, no text is yielded before
        a check has covered it; a flagging check stops the generation."""
        engine = self.engine
        prep = self.prepare(messages, options)
        input_moderation = self.moderate_input(prep)
        if input_moderation is not None and input_moderation.flagged:
            yield self.refuse_input(prep, input_moderation)
            return
        # The checks take a slot only when the answer's sequence will still find one.
        room = engine.free_slots - engine.num_waiting >= 2
        checks = self.open_checks(prep) if room else None
        decoder = AnswerDecoder(self.tokenizer, prep, checks=checks)
        request_id = -1
        try:
            request_id = engine.add_request(self.request(prep))
            while not decoder.done:
                due = [decoder] if decoder.check_due() else []
                if decoder.finish_reason is None:
                    # The check of the tokens so far rides in the pass that generates the next
                    # one; its text goes out first, then the step's token is pushed (dropped if
                    # the check flagged the answer).
                    events, deltas = self.step(due)
                    if deltas and deltas[0]:
                        yield deltas[0]
                    for event in events:
                        if event.request_id == request_id and (delta := decoder.push(event)):
                            yield delta
                elif due and (delta := self.run_checks(due)[0]):
                    yield delta  # the tail, once generation has finished
        finally:
            engine.cancel(request_id)
            self.close_checks(decoder)
        if decoder.error is not None:
            raise SamplingError(f"generation failed: {decoder.error}")
        yield from self.finish_decoded(prep, decoder, input_moderation)

    def generate(
        self, messages: Sequence[ChatMessage], options: GenerateOptions | None = None
    ) -> GenerationResult:
        """Generate one guarded answer in-process (the service batches through its worker)."""
        result: GenerationResult | None = None
        for item in self.stream(messages, options or GenerateOptions()):
            if isinstance(item, GenerationResult):
                result = item
        assert result is not None
        return result
