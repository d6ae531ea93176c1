"""Sentencepiece tokenizer and the Mistral chat template, as mistral-common encodes it.

Two template versions matter for Mistral 7B Instruct:

- v1 (v0.1, v0.2): each user turn is the plain text `[INST] {content} [/INST]`; the system
  prompt is prepended to the FIRST user turn, separated by a blank line.
- v3 (v0.3): `[INST]` and `[/INST]` are control tokens around the user text; the system prompt
  goes on the LAST user turn.

Assistant turns end with EOS (v3 strips trailing spaces first). Sentencepiece never emits
control ids when encoding text, so user text such as "[/INST]" or "</s>" stays text.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sentencepiece import SentencePieceProcessor

from model.errors import TokenizerError

# The tokenizer files mistral-common ships, by template version.
_MISTRAL_COMMON_FILES = {
    "v1": "tokenizer.model.v1",
    "v3": "mistral_instruct_tokenizer_240323.model.v3",
}

_ROLES = ("system", "user", "assistant")
# Which role may follow which, as mistral-common's validator allows it (no tool role here).
_NEXT_ROLES = {
    "system": {"system", "user", "assistant"},
    "user": {"system", "user", "assistant"},
    "assistant": {"user", "assistant"},
}
# mistral-common joins consecutive messages of one role (and all system prompts) with this.
_JOIN = "\n\n"


def mistral_common_tokenizer_path(version: str) -> Path:
    """Path of the real v1 or v3 Mistral tokenizer file shipped inside mistral-common."""
    if version not in _MISTRAL_COMMON_FILES:
        raise TokenizerError(f"no mistral-common tokenizer for version {version!r} (v1 or v3)")
    # find_spec locates the package without importing it (importing it pulls in pydantic).
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or spec.origin is None:
        raise TokenizerError("mistral-common is not installed (it ships the tokenizer files)")
    path = Path(spec.origin).parent / "data" / _MISTRAL_COMMON_FILES[version]
    if not path.is_file():
        raise TokenizerError(f"{path}: tokenizer file missing from the mistral-common install")
    return path


def _find_tokenizer_file(folder: Path) -> Path:
    """`tokenizer.model`, else the highest-versioned `tokenizer.model.vN` in a folder."""
    plain = folder / "tokenizer.model"
    if plain.is_file():
        return plain
    versioned = []
    for candidate in folder.glob("tokenizer.model.v*"):
        match = re.fullmatch(r"tokenizer\.model\.v(\d+)(m\d+)?", candidate.name)
        if match and candidate.is_file():
            versioned.append((int(match.group(1)), candidate.name, candidate))
    if not versioned:
        raise TokenizerError(f"{folder}: no tokenizer.model (or tokenizer.model.vN) in the folder")
    return max(versioned)[2]


class Tokenizer:
    """A Mistral sentencepiece tokenizer with the v1 or v3 chat template."""

    def __init__(self, sp: SentencePieceProcessor, path: Path):
        self._sp = sp
        self.path = path
        self._control_ids = frozenset(i for i in range(sp.get_piece_size()) if sp.is_control(i))
        if self._control_id("[SYSTEM_PROMPT]") is not None:
            # v7 puts the system prompt in its own control-token block: a different template.
            raise TokenizerError(f"{path}: v7 tokenizers are not supported (v1 and v3 are)")
        inst, end_inst = self._control_id("[INST]"), self._control_id("[/INST]")
        if inst is not None and end_inst is not None:
            self._version = "v3"
            self._inst_open, self._inst_close = [inst], [end_inst]
        else:
            self._version = "v1"
            self._inst_open = self.encode("[INST]", bos=False)
            self._inst_close = self.encode("[/INST]", bos=False)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a sentencepiece model file, or the tokenizer file of a checkpoint folder."""
        path = Path(path)
        if path.is_dir():
            path = _find_tokenizer_file(path)
        elif not path.is_file():
            raise TokenizerError(f"{path}: tokenizer file not found")
        sp = SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"{path}: not a readable sentencepiece model ({exc})") from exc
        return cls(sp, path)

    def _control_id(self, piece: str) -> int | None:
        token = self._sp.piece_to_id(piece)
        return token if token in self._control_ids else None

    @property
    def bos_id(self) -> int:
        """Begin-of-sequence id (1 in Mistral tokenizers)."""
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        """End-of-sequence id (2 in Mistral tokenizers); ends every assistant turn."""
        return int(self._sp.eos_id())

    @property
    def n_words(self) -> int:
        """Vocabulary size of the tokenizer file (32000 for v1, 32768 for v3)."""
        return int(self._sp.get_piece_size())

    @property
    def version(self) -> str:
        """Chat template version: "v3" when `[INST]` is a control token, else "v1"."""
        return self._version

    @property
    def control_ids(self) -> frozenset[int]:
        """Ids of control tokens (BOS, EOS, and in v3 `[INST]`, `[/INST]`, tool tokens...)."""
        return self._control_ids

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`; never contains control ids other than the BOS/EOS asked for."""
        ids: list[int] = self._sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, control tokens skipped."""
        n = self.n_words
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise TokenizerError(f"token id(s) {bad[:5]} out of range for a {n}-token vocabulary")
        return str(self._sp.decode([int(i) for i in ids if i not in self._control_ids]))

    def text_pieces(self) -> list[str]:
        """The pieces that encoding text may merge characters into ("\u2581" for a space):
        the learned, user-defined and unused ones (BPE may form an unused piece before it
        splits it again). Byte, control and unknown pieces are left out: text never becomes
        them by merging (a byte token stands for one byte of one character)."""
        sp = self._sp
        return [
            str(sp.id_to_piece(i))
            for i in range(sp.get_piece_size())
            if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))
        ]

    def id_to_piece(self, token: int) -> str:
        """The sentencepiece piece of one id (for debugging and label checks)."""
        return str(self._sp.id_to_piece(token))

    def inst_open(self) -> list[int]:
        """Tokens that open a user turn: v1 the text "[INST]", v3 the control token.

        `inst_open() + encode(content, bos=False) + inst_close()` is exactly encode_chat's user
        turn for any non-empty content (v1: sentencepiece never merges across the spaces of
        "[INST] {content} [/INST]", the dummy prefix "▁" of each piece plays the space).
        Empty v1 content differs: the template then holds a lone "▁" token.
        """
        return list(self._inst_open)

    def inst_close(self) -> list[int]:
        """Tokens that close a user turn: v1 the text "[/INST]", v3 the control token."""
        return list(self._inst_close)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Ids (with BOS) of a conversation, token-for-token as mistral-common encodes it.

        Messages are `{"role": "system"|"user"|"assistant", "content": str}`. End with a user
        turn to get a generation prompt. A final assistant turn ends with EOS (a complete
        conversation, for scoring), or without it when it has `"prefix": True` (the model
        continues that text).
        """
        turns, system_prompt = _normalize(messages)
        user_turns = [i for i, (role, _, _) in enumerate(turns) if role == "user"]
        # v1 puts the system prompt on the first user turn, v3 on the last.
        system_turn = user_turns[0] if self._version == "v1" else user_turns[-1]
        ids = [self.bos_id]
        for i, (role, content, prefix) in enumerate(turns):
            if role == "user":
                if system_prompt and i == system_turn:
                    content = system_prompt + _JOIN + content
                ids += self._encode_user(content)
            else:
                if self._version == "v3":
                    content = content.rstrip(" ")
                ids += self.encode(content, bos=False, eos=not prefix)
        return ids

    def _encode_user(self, content: str) -> list[int]:
        if self._version == "v1":
            # One encode call over the whole turn, like mistral-common: splitting it into
            # segments can tokenize differently at the boundaries (e.g. empty content).
            return self.encode(f"[INST] {content} [/INST]", bos=False)
        return self._inst_open + self.encode(content, bos=False) + self._inst_close


def _normalize(messages: Sequence[Mapping[str, Any]]) -> tuple[list[tuple[str, str, bool]], str]:
    """Validate, then merge like mistral-common: (role, content, prefix) turns, system prompt.

    System messages anywhere become one system prompt; consecutive messages of one role are
    joined with a blank line (a system message in between keeps them apart); a conversation
    that does not start with a user turn gets an empty one first.
    """
    _validate(messages)
    system_parts = [m["content"] for m in messages if m["role"] == "system" and m["content"]]
    turns: list[tuple[str, str, bool]] = []
    previous = None
    for message in messages:
        role, content = message["role"], message["content"]
        prefix = bool(message.get("prefix", False))
        if role != "system":
            if role == previous and turns:
                last_role, last_content, last_prefix = turns[-1]
                # Empty contents are skipped when joining, as mistral-common does.
                joined = _JOIN.join(c for c in (last_content, content) if c)
                turns[-1] = (last_role, joined, last_prefix or prefix)
            else:
                turns.append((role, content, prefix))
        previous = role
    if not turns or turns[0][0] != "user":
        turns.insert(0, ("user", "", False))
    return turns, _JOIN.join(system_parts)


def _validate(messages: Sequence[Mapping[str, Any]]) -> None:
    """Reject what mistral-common rejects (in any validation mode) with a TokenizerError."""
    if not messages:
        raise TokenizerError("conversation is empty: it needs at least one user message")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TokenizerError(f"message {i}: expected a dict with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in _ROLES:
            raise TokenizerError(f"message {i}: role must be system, user or assistant: {role!r}")
        if not isinstance(content, str):
            raise TokenizerError(f"message {i} ({role}): content must be a string")
        if role == "assistant" and not content:
            raise TokenizerError(f"message {i} (assistant): content must not be empty")
        if message.get("prefix") and (role != "assistant" or i != len(messages) - 1):
            raise TokenizerError(f"message {i}: only a final assistant message may be a prefix")
        if i and role not in _NEXT_ROLES[messages[i - 1]["role"]]:
            raise TokenizerError(
                f"message {i}: role {role!r} cannot follow {messages[i - 1]['role']!r}"
            )
    if len(messages) == 1 and messages[0]["role"] == "assistant":
        raise TokenizerError("a conversation must start with a user or system message")
