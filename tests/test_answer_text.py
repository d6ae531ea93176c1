"""An answer's text arriving in pieces (core/answer_text): the tokens decided piece by piece
are exactly the whole text's tokens, on the real Mistral v1 and v3 tokenizer files, for random
splits anywhere (inside words, inside a character's UTF-16 pair, inside a chat marker or a
CR LF); most tokens are decided before the end; released offsets cover only checked words."""

from __future__ import annotations

import random

import pytest

from model import Tokenizer
from model.tokenizer import mistral_common_tokenizer_path
from moderation.core.answer_text import AnswerTokens, CutRule
from moderation.core.prompts import encode_text
from moderation.core.text_safety import CHAT_MARKER_RE, open_marker

SAMPLES = [
    "  Hello world, this is a test.\r\nNew line\rCR [INST] x [ / inst ] y [/INST]  ",
    "你好，世界！这是一个测试。日本語のテキストも含まれています。",
    "emoji 😀👍🏽 mixed\x00ctl\x1fchars é́ ﬁ  double  spaces\t\ttabs  ",
    "[IN\x00ST] and [  I  N  S  T  ] and [\u200bINST] [/ INST]end[",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa bbbbbbbbbb 1234567890 12,345.67 http://x.io/a?b=c&d=e",
    "Ñandú ΑΒΓ абв עברית العربية हिन्दी   ",
    "def f(x):\n    return x  # indented code\n\n\n\tdone\r\n",
    "    \n\n  ",
    "x",
]


@pytest.fixture(scope="module", params=["v1", "v3"])
def tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    return Tokenizer.from_file(mistral_common_tokenizer_path(request.param))


def utf16_units(text: str) -> list[str]:
    """The text as a JavaScript client slices it: UTF-16 code units (an emoji is two)."""
    data = text.encode("utf-16-le", "surrogatepass")
    return [data[i : i + 2].decode("utf-16-le", "surrogatepass") for i in range(0, len(data), 2)]


def stream(tokenizer: Tokenizer, pieces: list[str]) -> tuple[list[int], AnswerTokens, list[int]]:
    """(all tokens, the tokenizer state, tokens decided after each piece)."""
    answer = AnswerTokens(tokenizer)
    tokens: list[int] = []
    counts = []
    for piece in pieces:
        tokens += answer.push(piece)
        counts.append(len(tokens))
    tokens += answer.finish()
    return tokens, answer, counts


def random_pieces(rng: random.Random, units: list[str]) -> list[str]:
    pieces, i = [], 0
    while i < len(units):
        k = rng.choice([1, 1, 2, 3, 5, 8, 13, 40])
        pieces.append("".join(units[i : i + k]))
        i += k
    return pieces


def test_random_splits_give_the_whole_texts_tokens(tokenizer: Tokenizer) -> None:
    assert CutRule.of(tokenizer).sound
    rng = random.Random(1234)
    for trial in range(300):
        text = "".join(rng.choice(SAMPLES) for _ in range(1 + trial % 5))
        units = utf16_units(text) if trial % 2 else list(text)
        tokens, answer, _ = stream(tokenizer, random_pieces(rng, units))
        assert tokens == encode_text(tokenizer, text), repr(text)
        assert answer.released(len(tokens)) == len(units)


def test_released_text_is_what_its_tokens_say(tokenizer: Tokenizer) -> None:
    """The first n tokens cover exactly the raw text released for them (cut to cut). (Texts
    without chat markers: a released prefix may end inside one, whose tokens are those of the
    marker neutralized whole.)"""
    rng = random.Random(7)
    plain = [s for s in SAMPLES[:7] if "[" not in s]
    for _ in range(60):
        text = "".join(rng.choice(plain) for _ in range(3))
        tokens, answer, _ = stream(tokenizer, random_pieces(rng, list(text)))
        for n in range(0, len(tokens) + 1, 3):
            offset = answer.released(n)
            covered = encode_text(tokenizer, text[:offset])
            assert len(covered) <= n
            assert tokens[: len(covered)] == covered


def test_most_tokens_are_decided_before_the_end(tokenizer: Tokenizer) -> None:
    """Word by word (and character by character in Chinese), at most a word is held back."""
    for text in (SAMPLES[0] * 4, SAMPLES[1] * 4):
        tokens, _, counts = stream(tokenizer, list(text))
        assert counts[-1] >= len(tokens) - 8
        # decided progressively, not all at once at some late piece
        assert counts[len(counts) // 2] >= len(tokens) // 3


def test_push_after_finish_is_refused(tokenizer: Tokenizer) -> None:
    answer = AnswerTokens(tokenizer)
    answer.push("hi")
    answer.finish()
    with pytest.raises(ValueError):
        answer.push("more")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain text", 10),
        ("a [", 2),
        ("a [ / i", 2),
        ("a [/INST] b", 11),  # complete: decided
        ("a [x] [in", 6),
        ("[IN\u200bS", 0),
        ("[INST", 0),
        ("[INSTX", 6),
    ],
)
def test_open_marker(text: str, expected: int) -> None:
    assert open_marker(text) == expected
    # what it calls decided neutralizes alike whatever follows
    for tail in ("T]", "]", "x", ""):
        whole = CHAT_MARKER_RE.sub("()", text + tail)
        assert whole.startswith(CHAT_MARKER_RE.sub("()", text[:expected]))


def test_the_stream_prompt_is_classifys_prompt_less_the_answer(tokenizer: Tokenizer) -> None:
    """Planner.plan_answer_stream: its body, then the answer's tokens and the turn closer, is
    the body Classify builds for the complete answer in the same context."""
    from moderation.core.decision import ClassifyItem
    from moderation.core.limits import ModelLimits
    from moderation.core.planning import Planner
    from moderation.core.policy import Role
    from moderation.core.prompts import ANSWER_MARKER

    limits = ModelLimits(window=4096, max_context=8192, max_seq_len=8192, attention_backend="sdpa")
    planner = Planner(tokenizer, limits)
    answer = SAMPLES[0] + SAMPLES[2]
    from moderation.core.chat import ChatMessage

    conversation = [
        ChatMessage("user", "Hi"),
        ChatMessage("assistant", "Hello!"),
        ChatMessage("user", "Say something."),
    ]
    for stream_item, whole_item in (
        (
            ClassifyItem(ANSWER_MARKER, role=Role.OUTPUT, user_prompt="Question?"),
            ClassifyItem(answer, role=Role.OUTPUT, user_prompt="Question?"),
        ),
        (
            ClassifyItem(messages=[*conversation, ChatMessage("assistant", ANSWER_MARKER)]),
            ClassifyItem(messages=[*conversation, ChatMessage("assistant", answer)]),
        ),
    ):
        planned, room = planner.plan_answer_stream(stream_item)
        whole = planner.plan(whole_item)
        tokens = encode_text(tokenizer, answer)
        assert planned.prefix == whole.prefix
        assert (*planned.bodies[0], *tokens, *tokenizer.inst_close()) == whole.bodies[0]
        assert planned.context_tokens == whole.context_tokens > 0
        assert room == planner.max_text_tokens - whole.context_tokens
