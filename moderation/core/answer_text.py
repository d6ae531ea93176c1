"""An answer's text arriving in pieces, tokenized exactly as the whole text will be.

`ModerateStream` checks an answer another LLM is writing: the caller sends text deltas of any
size (a piece may end inside a word, or inside a character's UTF-16 pair on some transports),
and the checks must cover the tokens of the *whole* answer tokenized at once
(`prompts.encode_text`: `clean` then sentencepiece), or the final verdict would differ from
`Classify` of the complete answer. So a piece's tail that is not decided yet is held back:

1. **Cleaning** (`text_safety.clean`): CR LF and CR become LF, so a piece ending in CR waits
   for the next character; control characters go; a `[` that may still start a chat marker
   (`text_safety.open_marker`) waits until the marker is complete or impossible; leading
   whitespace goes and trailing whitespace waits for what follows it (it is stripped at the end).
2. **Cutting**: sentencepiece merges characters into pieces of its vocabulary (BPE, by score;
   user-defined pieces matched whole). Where two adjacent characters `ab` occur together in no
   piece, no token can span them, no merge crosses there, and the text's tokens are the tokens
   of its left part followed by those of its right part (each merge sequence runs alone; see
   `CutRule`). Decided text is tokenized up to its last such cut; the rest waits. Between two
   words there is always one (no Mistral piece holds a space after another character), and
   for text without spaces (Chinese, Japanese) most character pairs are cuts.

Each segment is encoded on its own: the first as the text's start (sentencepiece's leading
"dummy" space included), the others behind a newline (in no piece, so a cut on both sides)
whose tokens are dropped. A tokenizer for which the rule cannot be shown (a normalizer that
rewrites text, a piece with a newline) gets no cuts: its answer is tokenized whole at the end.
"""

from __future__ import annotations

import bisect
import functools
import re
from dataclasses import dataclass, field

from model import Tokenizer
from moderation.core.text_safety import (
    CHAT_MARKER_RE,
    CONTROL_CHAR_RE,
    open_marker,
)

SPACE = "\u2581"  # sentencepiece's piece for a space
# What `_Cleaner._lines` has to look at character by character; most pieces hold none of it.
_SPECIAL_RE = re.compile(rf"[\r\ud800-\udfff]|{CONTROL_CHAR_RE.pattern}")


@dataclass(frozen=True)
class CutRule:
    """Where a tokenizer's tokens of a text can be computed in parts (see the module doc)."""

    pairs: frozenset[str]  # every two adjacent characters of a piece, spaces as SPACE
    anchor: tuple[int, ...]  # the tokens of "\n" alone: dropped before a later segment
    sound: bool  # False: no cut is known safe, the text is tokenized whole at the end

    @staticmethod
    @functools.cache
    def of(tokenizer: Tokenizer) -> CutRule:
        pieces = tokenizer.text_pieces()
        pairs = frozenset(p[i : i + 2] for p in pieces for i in range(len(p) - 1))
        anchor = tuple(tokenizer.encode("\n", bos=False))
        # The rule holds when the tokenizer keeps text as it is (an identity normalizer: a
        # ligature, a full-width digit and a double space come back unchanged) and a newline
        # sits in no piece (so it can anchor a later segment).
        probe = "a  b\ufb01\uff11 c"
        sound = (
            tokenizer.decode(tokenizer.encode(probe, bos=False)) == probe
            and not any("\n" in p for p in pieces)
            and tokenizer.decode(list(anchor)) == "\n"
        )
        return CutRule(pairs, anchor, sound)

    def is_cut(self, left: str, right: str) -> bool:
        """Whether a token boundary lies between these two characters whatever surrounds
        them."""
        pair = (left + right).replace(" ", SPACE)
        return self.sound and pair not in self.pairs

    def encode(self, tokenizer: Tokenizer, segment: str, *, first: bool) -> list[int]:
        """The tokens of `segment` as they are inside the whole text, between two cuts."""
        if first:
            return tokenizer.encode(segment, bos=False)
        ids = tokenizer.encode("\n" + segment, bos=False)
        n = len(self.anchor)
        if tuple(ids[:n]) != self.anchor:  # CutRule.sound promised otherwise
            raise AssertionError("a segment behind a newline merged with it")
        return ids[n:]


@dataclass
class _Cleaner:
    """`text_safety.clean` of text arriving in pieces: what is decided, with the offset in the
    raw text of each character it keeps."""

    raw: int = 0  # raw characters received
    pending: str = ""  # a CR or a high surrogate that waits for the next character
    pending_at: list[int] = field(default_factory=list)
    started: bool = False  # a character other than whitespace was kept (leading strip)
    held: str = ""  # cleaned characters that may still be part of a chat marker
    held_at: list[int] = field(default_factory=list)
    space: str = ""  # trailing whitespace of the decided text, kept only if more follows
    space_at: list[int] = field(default_factory=list)

    def push(self, delta: str, *, end: bool = False) -> tuple[str, list[int]]:
        chars, at = self._lines(delta, end=end)
        chars, at = self.held + chars, self.held_at + at
        cut = len(chars) if end else open_marker(chars)
        self.held, self.held_at = chars[cut:], at[cut:]
        # Markers never reach past `cut` (each holds one "[", its first); replacing one keeps
        # the length, so the offsets still line up.
        decided = CHAT_MARKER_RE.sub(lambda m: f"({m.group(0)[1:-1]})", chars[:cut])
        at = at[:cut]
        if not self.started:
            lead = len(decided) - len(decided.lstrip())
            decided, at = decided[lead:], at[lead:]
            self.started = bool(decided)
        if not decided:
            return "", []
        decided, at = self.space + decided, self.space_at + at
        keep = len(decided.rstrip())
        self.space, self.space_at = decided[keep:], at[keep:]
        return decided[:keep], at[:keep]

    def _lines(self, delta: str, *, end: bool) -> tuple[str, list[int]]:
        """Line ends, control characters and surrogates as `neutralize` treats them. A JSON
        client may split a character's UTF-16 pair across two pieces: a high surrogate at the
        end of a piece waits for its low half (a pair is one character, a lone half U+FFFD)."""
        base = self.raw
        self.raw += len(delta)
        at = list(range(base, base + len(delta)))
        if self.pending:
            delta, at = self.pending + delta, [*self.pending_at, *at]
            self.pending, self.pending_at = "", []
        if not _SPECIAL_RE.search(delta):
            return delta, at
        out: list[str] = []
        out_at: list[int] = []
        n = len(delta)
        skip = False
        for i, ch in enumerate(delta):
            if skip:
                skip = False
                continue
            nxt = delta[i + 1] if i + 1 < n else None
            if nxt is None and not end and (ch == "\r" or "\ud800" <= ch <= "\udbff"):
                self.pending, self.pending_at = ch, [at[i]]  # its meaning depends on the next
                break
            if ch == "\r":
                if nxt == "\n":
                    continue  # the LF that follows stands for both
                ch = "\n"
            elif "\ud800" <= ch <= "\udbff" and nxt is not None and "\udc00" <= nxt <= "\udfff":
                ch, skip = (ch + nxt).encode("utf-16-le", "surrogatepass").decode("utf-16-le"), True
            elif "\ud800" <= ch <= "\udfff":
                ch = "\ufffd"
            elif CONTROL_CHAR_RE.match(ch):
                continue
            out.append(ch)
            out_at.append(at[i])
        return "".join(out), out_at


class AnswerTokens:
    """The tokens of an answer whose text arrives in pieces (see the module doc).

    `push(delta)` returns the tokens now decided, `finish()` the rest; together they are
    `prompts.encode_text(tokenizer, whole text)`. `released(n)` is how much of the raw text the
    first n tokens cover: up to the last cut they reach (the whole text once finished).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.rule = CutRule.of(tokenizer)
        self._clean = _Cleaner()
        self._text = ""  # cleaned text not yet tokenized (it starts at a cut)
        self._at: list[int] = []  # raw offset of each of its characters
        self._first = True  # no segment encoded yet
        self._scanned = 0  # self._text[:_scanned] holds no cut
        self.tokens = 0  # tokens decided so far
        self.chars = 0  # raw characters received
        self.finished = False
        # At each cut, (n, offset): the first n tokens cover the raw text before offset. One
        # list of pairs, appended whole: `released` may read it from another thread.
        self._cuts: list[tuple[int, int]] = [(0, 0)]

    def push(self, delta: str) -> list[int]:
        if self.finished:
            raise ValueError("the answer is already complete")
        self.chars += len(delta)
        text, at = self._clean.push(delta)
        self._text += text
        self._at += at
        return self._encode(self._last_cut())

    def finish(self) -> list[int]:
        """The last tokens, once the text is complete."""
        if self.finished:
            return []
        text, at = self._clean.push("", end=True)
        self._text += text
        self._at += at
        ids = self._encode(len(self._text))
        self.finished = True
        self._cuts.append((self.tokens, self.chars))
        return ids

    def released(self, tokens: int) -> int:
        """Raw characters covered by the first `tokens` tokens, whole words (cut to cut)."""
        cuts = self._cuts
        return cuts[bisect.bisect_right(cuts, tokens, key=lambda cut: cut[0]) - 1][1]

    def _last_cut(self) -> int:
        text, rule = self._text, self.rule
        # Only the new characters can make a new cut: the text grows, it is scanned once.
        for p in range(len(text) - 1, max(self._scanned, 1) - 1, -1):
            if rule.is_cut(text[p - 1], text[p]):
                return p
        self._scanned = len(text)
        return 0

    def _encode(self, end: int) -> list[int]:
        if end <= 0:
            return []
        ids = self.rule.encode(self.tokenizer, self._text[:end], first=self._first)
        self._first = False
        self.tokens += len(ids)
        if end < len(self._text):
            self._cuts.append((self.tokens, self._at[end]))
        self._text, self._at = self._text[end:], self._at[end:]
        self._scanned = len(self._text)  # the cut was the last one
        return ids
