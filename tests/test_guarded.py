"""Guarded generation: the guardrail prompt, refusing flagged input, withholding flagged output,
and streaming that shows nothing unchecked. End to end on the real engine (demo checkpoint);
the refusal logic also against a test double of the classifier."""

from __future__ import annotations

from typing import Any

import pytest

from moderation.core.builtin_policies import BUILTIN_POLICIES
from moderation.core.chat import ChatMessage
from moderation.core.decision import ClassifyItem, decide
from moderation.core.errors import InvalidArgument
from moderation.core.generation import (
    INPUT_REFUSAL,
    OUTPUT_REFUSAL,
    GenerateOptions,
    GenerationResult,
)
from moderation.core.guarded import GuardedGenerator, TextStream
from moderation.core.policy import GUARDRAIL_SYSTEM_PROMPT, Role

DICTS = [{"role": "user", "content": "Write a haiku about the sea."}]
USER = [ChatMessage("user", "Write a haiku about the sea.")]
ALWAYS = 0.0  # P(not acceptable) >= 0: flagged whatever the model says
NEVER = 1.0  # flagged only at certainty, which the scores of the demo model never reach


@pytest.fixture(scope="module")
def generator(demo_runtime: Any) -> GuardedGenerator:
    return demo_runtime.generator


def test_the_guardrail_system_prompt_is_on_by_default(generator: GuardedGenerator) -> None:
    tok = generator.tokenizer
    prep = generator.prepare(USER, GenerateOptions())
    system = {"role": "system", "content": GUARDRAIL_SYSTEM_PROMPT}
    assert prep.prompt == tok.encode_chat([system, *DICTS])
    assert GUARDRAIL_SYSTEM_PROMPT in tok.decode(prep.prompt)


def test_the_guardrail_can_be_replaced_or_turned_off(generator: GuardedGenerator) -> None:
    tok = generator.tokenizer
    replaced = generator.prepare(USER, GenerateOptions(system_prompt="Answer in French."))
    assert replaced.prompt == tok.encode_chat(
        [{"role": "system", "content": "Answer in French."}, *DICTS]
    )
    off = generator.prepare(USER, GenerateOptions(guardrail=False))
    assert off.prompt == tok.encode_chat(DICTS)


def test_input_moderation_is_planned_once_when_the_generation_is_prepared(
    generator: GuardedGenerator,
) -> None:
    planner = generator.classifier.planner
    prep = generator.prepare(USER, GenerateOptions(moderate_input=True, policy="mistral-13"))
    item = ClassifyItem(USER[-1].content, role=Role.INPUT, policy="mistral-13")
    assert prep.input_planned == planner.plan(item)
    assert generator.prepare(USER, GenerateOptions()).input_planned is None


def test_generation_without_moderation_returns_the_answer(generator: GuardedGenerator) -> None:
    result = generator.generate(USER, GenerateOptions(max_new_tokens=8))
    assert not result.refused
    assert result.finish_reason in {"stop", "length"}
    assert 1 <= result.completion_tokens <= 8
    assert result.input_moderation is None and result.output_moderation is None
    assert result.prompt_tokens > 0
    assert "demo" in result.model


def test_flagged_input_is_refused_without_generating(demo_runtime: Any) -> None:
    generator = demo_runtime.generator
    demo_runtime.classifier.warm_up()  # policy prefixes pre-filled, as the server does
    passes = demo_runtime.engine.stats.forward_passes
    result = generator.generate(
        USER, GenerateOptions(moderate_input=True, threshold=ALWAYS, max_new_tokens=8)
    )
    assert result.refused and result.refusal == INPUT_REFUSAL
    assert result.finish_reason == "input_flagged"
    assert result.text == "" and result.completion_tokens == 0
    assert result.input_moderation is not None and result.input_moderation.flagged
    # Only the classification ran: the text's pre-fill (the demo window is 32 tokens, so a
    # couple of chunks) and one scoring pass; no decode steps.
    assert demo_runtime.engine.stats.forward_passes - passes <= 3
    assert not demo_runtime.engine.has_unfinished()


def test_flagged_output_is_withheld(generator: GuardedGenerator) -> None:
    result = generator.generate(
        USER, GenerateOptions(moderate_output=True, threshold=ALWAYS, max_new_tokens=8)
    )
    assert result.refused and result.refusal == OUTPUT_REFUSAL
    assert result.finish_reason == "output_flagged"
    assert result.text == ""
    assert result.completion_tokens > 0
    assert result.output_moderation is not None and result.output_moderation.flagged


def test_unflagged_input_and_output_pass(generator: GuardedGenerator) -> None:
    options = GenerateOptions(
        moderate_input=True, moderate_output=True, threshold=NEVER, max_new_tokens=8
    )
    result = generator.generate(USER, options)
    plain = generator.generate(USER, GenerateOptions(max_new_tokens=8))
    assert not result.refused
    assert result.text == plain.text  # moderation does not change the answer
    assert result.input_moderation is not None and not result.input_moderation.flagged
    assert result.text.strip(), "the demo must answer something for output moderation to check"
    assert result.output_moderation is not None and not result.output_moderation.flagged
    assert result.output_moderation.prompt_tokens > 0  # the answer itself was scored


def test_streaming_shows_nothing_before_output_moderation(generator: GuardedGenerator) -> None:
    flagged = list(
        generator.stream(
            USER, GenerateOptions(moderate_output=True, threshold=ALWAYS, max_new_tokens=6)
        )
    )
    assert len(flagged) == 1 and isinstance(flagged[0], GenerationResult)
    passed = list(
        generator.stream(
            USER, GenerateOptions(moderate_output=True, threshold=NEVER, max_new_tokens=6)
        )
    )
    final = passed[-1]
    assert isinstance(final, GenerationResult)
    # The checked text arrives only after the check, in one piece.
    assert all(isinstance(p, str) for p in passed[:-1])
    assert "".join(p for p in passed[:-1] if isinstance(p, str)) == final.text


def test_streaming_without_output_moderation_yields_the_answer_piecewise(
    generator: GuardedGenerator,
) -> None:
    parts = list(generator.stream(USER, GenerateOptions(max_new_tokens=12)))
    final = parts[-1]
    assert isinstance(final, GenerationResult)
    deltas = [p for p in parts[:-1] if isinstance(p, str)]
    assert len(deltas) > 1
    assert "".join(deltas) == final.text


def test_text_stream_waits_for_complete_characters(demo_runtime: Any) -> None:
    tok = demo_runtime.tokenizer
    ids = tok.encode("日本 🙂 ok", bos=False)
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize(
    ("messages", "options", "field"),
    [
        ([], GenerateOptions(), "messages"),
        ([ChatMessage("wizard", "x")], GenerateOptions(), "messages[0].role"),
        # The one rule of Classify and Generate: no empty assistant turn, earlier ones included.
        ([*USER, ChatMessage("assistant", " "), *USER], GenerateOptions(), "messages[1].content"),
        (USER, GenerateOptions(temperature=float("inf")), "temperature"),
        (USER, GenerateOptions(temperature=float("nan")), "temperature"),
        (USER, GenerateOptions(max_new_tokens=0), "max_new_tokens"),
        (USER, GenerateOptions(temperature=-1), "temperature"),
        (USER, GenerateOptions(top_p=0), "top_p"),
        (USER, GenerateOptions(moderate_input=True, policy="nope"), "policy"),
        (USER, GenerateOptions(moderate_output=True, threshold=2.0), "threshold"),
    ],
)
def test_bad_generation_requests_name_the_field(
    generator: GuardedGenerator,
    messages: list[dict[str, str]],
    options: GenerateOptions,
    field: str,
) -> None:
    with pytest.raises(InvalidArgument) as err:
        generator.prepare(messages, options)
    assert err.value.field == field


class ScriptedStream:
    def __init__(self, prep: Any):
        self.prep = prep
        self.checked: list[int] = []


class ScriptedClassifier:
    """Test double: flags exactly the texts it is told to. An answer checked as it grows is
    classified as the text of the tokens checked so far."""

    def __init__(self, flag: set[str], planner: Any, tokenizer: Any = None):
        self.flag = flag
        self.planner = planner  # prompts are validated and built for real
        self.tokenizer = tokenizer
        self.seen: list[ClassifyItem] = []
        self.closed = 0

    def open_output_stream(self, prep: Any) -> ScriptedStream:
        return ScriptedStream(prep)

    def close_output_stream(self, stream: ScriptedStream) -> None:
        self.closed += 1

    def check_outputs(
        self, checks: list[tuple[ScriptedStream, list[int]]], *, run: Any = None
    ) -> list[Any]:
        if run is not None:  # the checks ride in an engine step: take that step
            run([])
        items = []
        for stream, tokens in checks:
            stream.checked.extend(tokens)
            items.append(stream.prep.output_item(self.tokenizer.decode(stream.checked)))
        return self.classify_many(items)

    def run(self, planned: list[Any]) -> list[Any]:
        """Planned input items (planned at `prepare`): flagged when their prompt quotes a
        flagged text."""
        texts = [self.tokenizer.decode(list(p.bodies[0])) for p in planned]
        return self._decide([any(f in t for f in self.flag) for t in texts])

    def classify_many(self, items: list[ClassifyItem]) -> list[Any]:
        self.seen.extend(items)
        return self._decide([item.text in self.flag for item in items])

    def _decide(self, flagged: list[bool]) -> list[Any]:
        policy = BUILTIN_POLICIES["paper"]
        out = []
        for bad in flagged:
            bad = bad or "*" in self.flag
            lps = [0.0, -9.0, -9.0, -9.0] if bad else [-9.0, -9.0, -9.0, 0.0]
            out.append(
                decide(
                    policy,
                    lps,
                    threshold=0.5,
                    category_thresholds={},
                    model_id="t",
                    prompt_tokens=1,
                )
            )
        return out


def test_refusal_logic_with_a_scripted_classifier(demo_runtime: Any) -> None:
    scripted = ScriptedClassifier({"bad question"}, demo_runtime.planner, demo_runtime.tokenizer)
    generator = GuardedGenerator(
        demo_runtime.engine,
        demo_runtime.tokenizer,
        scripted,
        model_id="t",  # type: ignore[arg-type]
    )
    options = GenerateOptions(moderate_input=True, moderate_output=True, max_new_tokens=4)
    refused = generator.generate([ChatMessage("user", "bad question")], options)
    assert refused.finish_reason == "input_flagged"
    fine = generator.generate([ChatMessage("user", "good question")], options)
    assert not fine.refused
    # Output moderation saw the answer, with the user prompt as its context.
    answer_checks = [i for i in scripted.seen if i.role == "output"]
    assert answer_checks and answer_checks[-1].user_prompt == "good question"
    scripted.flag = {"*"}
    withheld = generator.generate([ChatMessage("user", "x")], GenerateOptions(
        moderate_output=True, max_new_tokens=4))  # fmt: skip
    assert withheld.finish_reason == "output_flagged" and withheld.text == ""
