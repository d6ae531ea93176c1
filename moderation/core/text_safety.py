"""Text safety: untrusted text made safe to place in a prompt.

The text being moderated is data: it must not be able to end the instruction block or forge the
answer. In the v1 chat template `[INST]`/`[/INST]` are plain text whose tokens are the real
turn markers, so they are broken wherever they appear, in any case or spacing.
"""

from __future__ import annotations

import re

# Chat-template markers and control characters that no trusted policy text may contain and that
# `neutralize` breaks in untrusted text: policy validation and neutralization share them.
# `_IGNORABLE`: whitespace and invisible format characters that a reader (or the model) skips, so
# "[ / INST ]", "[\u200bINST]" or "[I N S T]" count as markers too.
_IGNORABLE = r"[\s\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]*"
CHAT_MARKER_RE = re.compile(
    rf"\[{_IGNORABLE}[/\\]?{_IGNORABLE}I{_IGNORABLE}N{_IGNORABLE}S{_IGNORABLE}T{_IGNORABLE}\]",
    re.IGNORECASE,
)
# C0 controls except tab and newline, DEL, and C1 controls.
CONTROL_CHAR_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_LONE_SURROGATE_RE = re.compile(r"[\ud800-\udfff]")
_IGNORABLE_RE = re.compile(_IGNORABLE)


def neutralize(text: str) -> str:
    """Untrusted text made safe to place in a prompt; ordinary text is returned unchanged.

    - CR and CRLF become LF; other C0 controls (but tab and LF), DEL and C1 controls are removed
      (removed, not replaced: a control character inside a word must not hide the word);
    - lone surrogates (invalid Unicode, unencodable) become U+FFFD;
    - `[INST]` and `[/INST]` in any case, spacing or with invisible characters inside get
      parentheses instead of brackets, e.g. "[/INST]" -> "(/INST)": in the v1 template their
      tokens are the real turn markers, and in v3 they would still read like them.
    Runs after control removal so that "[IN\\x00ST]" cannot reassemble afterwards.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = CONTROL_CHAR_RE.sub("", text)
    text = _LONE_SURROGATE_RE.sub("\ufffd", text)
    # A replacement has no brackets, so one pass cannot create a new marker; looping to a fixed
    # point makes that hold without relying on the argument.
    while True:
        replaced = CHAT_MARKER_RE.sub(lambda m: f"({m.group(0)[1:-1]})", text)
        if replaced == text:
            return text
        text = replaced


def clean(text: str) -> str:
    """Untrusted text as it goes into a prompt body: neutralized, without outer whitespace."""
    # Outer whitespace carries no meaning for moderation and would tokenize differently at the
    # segment boundaries; without it prefix + body equal the joined text's tokens.
    return neutralize(text).strip()


def is_blank(text: str) -> bool:
    """Whether nothing readable is left of `text` once cleaned: only whitespace, control
    characters or invisible format characters ("\\x00", "\\u200b"). Such text has nothing to
    classify or answer."""
    return not _IGNORABLE_RE.sub("", clean(text))


# One ignorable character, and the marker's letters as CHAT_MARKER_RE matches them (case
# insensitively, as its flags say), for `open_marker`.
_IGNORABLE_CHAR_RE = re.compile(_IGNORABLE[:-1])
_MARKER_LETTERS = [re.compile(letter, re.IGNORECASE) for letter in "INST"]


def open_marker(text: str) -> int:
    """Where in `text` a chat marker may still begin once more text is appended: the index of
    the first "[" whose rest is an unfinished `CHAT_MARKER_RE` match, else len(text).

    `neutralize` of text arriving in pieces is decided up to there: any marker before it is
    complete (a marker holds no "[" but its first), so text[:i] neutralizes alike whatever
    follows. The walk is CHAT_MARKER_RE's pattern, one character at a time (its parts are
    disjoint, so it never backtracks)."""
    i = text.find("[")
    while i != -1:
        letters = 0  # of I, N, S, T matched so far
        slash = True  # a slash may still come (only before the letters)
        for ch in text[i + 1 :]:
            if _IGNORABLE_CHAR_RE.fullmatch(ch):
                continue
            if slash and ch in "/\\":
                slash = False
            elif letters < 4 and _MARKER_LETTERS[letters].fullmatch(ch):
                letters, slash = letters + 1, False
            else:
                break  # complete ("]" after T) or not a marker: decided either way
        else:
            return i  # the text ended inside a possible marker
        i = text.find("[", i + 1)
    return len(text)
