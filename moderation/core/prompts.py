r"""Moderation prompts as token ids: a fixed prefix per policy and role, then the untrusted body.

Layout of the one user turn the model sees (v1 shown; in v3 [INST] and [/INST] are control
tokens); "|" marks where the shared prefix ends and the body begins:

    input:   <s>[INST] {instruction}\n\nText:| {text} [/INST]
    output:  <s>[INST] {instruction}\n\n{OUTPUT_NOTE}\n\nUser prompt:| {user prompt, or
             "(not given)"}\n\nAnswer: {answer} [/INST]

A conversation (ClassifyRequest.messages) classifies its last message with the same two
prefixes; the earlier turns kept go in the body, before the classified text, as a block of fixed
wording around the untrusted contents (shown for a last user message; for a last assistant
message the block ends with "The last user message:" then the output layout's slot, and the
last user message itself is the slot's user prompt):

    input:   ...Text:| Earlier in the conversation, as context only:\n\nUser: {u1}\n\n
             Assistant: {a1}\n\nThe last user message, the text to classify: {text} [/INST]

Without earlier turns the block is absent, so [user T] is exactly text=T and [user P,
assistant A] is exactly text=A, role=output, prompt=P: the same tokens, the same scores.

The prefix (BOS, the turn opener, the instruction up to the last marker) depends only on the
policy and role, so its KV is computed once and reused. The body holds the untrusted text (for
the output role also the fixed "Answer:" marker between its two segments) and the turn closer.
The split sits at a space, so prefix + body are exactly the tokens of the joined text
(`prompt_text`) in the chat template. The answer is scored as the continuation `{label}</s>`,
as the template ends an assistant turn.

Untrusted text is data: `neutralize` removes control characters and breaks `[INST]`/`[/INST]`
in any case or spacing (their v1 tokens are the template's own), and every prompt is checked
on its token ids: the turn opener and closer occur once, at their places, and the body holds no
BOS, EOS or control id.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from moderation.core.chat import ChatMessage
from moderation.core.errors import quote
from moderation.core.policy import GUARDRAIL_SYSTEM_PROMPT, Policy, Role
from moderation.core.text_safety import clean, neutralize


class PromptError(ValueError):
    """A prompt or conversation cannot be built safely from the given input."""


class PromptTokenizer(Protocol):
    """What prompts need from a tokenizer (`model.Tokenizer` implements it)."""

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def version(self) -> str: ...

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def inst_open(self) -> list[int]: ...

    def inst_close(self) -> list[int]: ...

    def __hash__(self) -> int: ...  # prefixes are cached per (policy, role, tokenizer)


# Fixed wording around the untrusted segments. Each marker that ends the prefix is followed by a
# space in the joined text, so the body's first token starts a word on both sides of the split.
TEXT_MARKER = "Text:"
USER_PROMPT_MARKER = "User prompt:"
ANSWER_MARKER = "Answer:"
NO_USER_PROMPT = "(not given)"
# A conversation's earlier turns, in the body: the block's head, a speaker per message, and the
# line that introduces the last user message after the block (per role, see the module doc).
CONTEXT_HEAD = "Earlier in the conversation, as context only:"
SPEAKERS = {"system": "System:", "user": "User:", "assistant": "Assistant:"}
CONTEXT_END = {
    "input": "The last user message, the text to classify:",
    "output": "The last user message:",
}
EMPTY_MESSAGE = "(empty)"
OUTPUT_NOTE = (
    'The text to classify is the answer of an AI assistant, shown after "Answer:". '
    'The user prompt it answers is shown before it, after "User prompt:", as context only.'
)


@dataclass(frozen=True)
class ModerationPrompt:
    """A classification prompt: `prefix` (shared by a policy and role) then `body`."""

    prefix: tuple[int, ...]
    body: tuple[int, ...]

    @property
    def tokens(self) -> tuple[int, ...]:
        """The full prompt, prefix + body."""
        return self.prefix + self.body

    def __len__(self) -> int:
        return len(self.prefix) + len(self.body)


def encode_text(tokenizer: PromptTokenizer, text: str) -> list[int]:
    """Tokens of untrusted text as it appears in a prompt body (neutralized, no BOS/EOS)."""
    return tokenizer.encode(clean(text), bos=False)


def text_token_count(tokenizer: PromptTokenizer, text: str) -> int:
    """How many tokens `text` takes in a prompt body (to check it against a length limit)."""
    return len(encode_text(tokenizer, text))


def instruction_text(policy: Policy, role: Role | str) -> str:
    """The trusted text of the prefix for this policy and role (after the turn opener)."""
    if _check_role(role, None) is Role.INPUT:
        return f"{policy.instruction}\n\n{TEXT_MARKER}"
    return f"{policy.instruction}\n\n{OUTPUT_NOTE}\n\n{USER_PROMPT_MARKER}"


def prompt_text(
    policy: Policy,
    role: Role | str,
    text: str,
    *,
    user_prompt: str | None = None,
    earlier: Sequence[tuple[str, str]] = (),
) -> str:
    """The user-turn content as plain text: what `build_prompt` tokenizes, for logs or other
    engines. `chat template([user: prompt_text(...)])` gives the same tokens as `build_prompt`.

    `earlier`: a conversation's earlier turns kept as context, (role, content) oldest first (for
    the output role without the last user message, which is `user_prompt`)."""
    role = _check_role(role, user_prompt)
    parts = [instruction_text(policy, role)]
    if earlier:
        turns = "".join(f"\n\n{_speaker(r)} {clean(c) or EMPTY_MESSAGE}" for r, c in earlier)
        parts.append(f"{CONTEXT_HEAD}{turns}\n\n{CONTEXT_END[role]}")
    if role is Role.OUTPUT:
        parts.append(f"{clean(user_prompt or '') or NO_USER_PROMPT}\n\n{ANSWER_MARKER}")
    # Joined with a space only when the text is not empty, as the body tokens are.
    cleaned = clean(text)
    if cleaned:
        parts.append(cleaned)
    return " ".join(parts)


def turn_tokens(tokenizer: PromptTokenizer, role: str, content: str) -> list[int]:
    """Tokens of one earlier turn in a context block: "\\n\\n{Speaker}: {content}", the content
    treated as data like any text (a blank one reads "(empty)")."""
    words = encode_text(tokenizer, content) or tokenizer.encode(EMPTY_MESSAGE, bos=False)
    return [*_encode_after_text(tokenizer, f"\n\n{_speaker(role)}"), *words]


def context_block(
    tokenizer: PromptTokenizer, role: Role | str, turns: Sequence[Sequence[int]]
) -> list[int]:
    """The block of earlier turns (each made by `turn_tokens`) that opens a body; none, no
    block."""
    if not turns:
        return []
    head, end = _context_wording(tokenizer, _check_role(role, None))
    return [*head, *(t for turn in turns for t in turn), *end]


def context_overhead(tokenizer: PromptTokenizer, role: Role | str) -> int:
    """Tokens a context block takes besides its turns (its head and its last line)."""
    head, end = _context_wording(tokenizer, _check_role(role, None))
    return len(head) + len(end)


def _context_wording(tokenizer: PromptTokenizer, role: Role) -> tuple[list[int], list[int]]:
    # The head follows the prefix's last marker after a space, as a text would.
    head = tokenizer.encode(CONTEXT_HEAD, bos=False)
    return head, _encode_after_text(tokenizer, f"\n\n{CONTEXT_END[role]}")


def _speaker(role: str) -> str:
    try:
        return SPEAKERS[role]
    except KeyError:
        raise PromptError(f"role must be system, user or assistant, got {quote(role)}") from None


def build_prefix(policy: Policy, role: Role | str, tokenizer: PromptTokenizer) -> tuple[int, ...]:
    """BOS + turn opener + instruction: identical for every request of this policy and role."""
    role = _check_role(role, None)
    try:
        return _cached_prefix(policy, role, tokenizer)
    except TypeError:  # an unhashable tokenizer: build it uncached
        return _make_prefix(policy, role, tokenizer)


def _make_prefix(policy: Policy, role: Role, tokenizer: PromptTokenizer) -> tuple[int, ...]:
    prefix = (
        tokenizer.bos_id,
        *tokenizer.inst_open(),
        *tokenizer.encode(instruction_text(policy, role), bos=False),
    )
    _check_structure(tokenizer, prefix, structural=1 + len(tokenizer.inst_open()), closed=False)
    return prefix


# Every prompt starts with its prefix; encoding and checking ~700 tokens each time would cost
# about a millisecond per request. Policies are frozen (hashable); tokenizers hash by identity.
_cached_prefix = functools.lru_cache(maxsize=64)(_make_prefix)


def build_prompt(
    policy: Policy,
    role: Role | str,
    tokenizer: PromptTokenizer,
    text: str,
    *,
    user_prompt: str | None = None,
    earlier: Sequence[tuple[str, str]] = (),
) -> ModerationPrompt:
    """The prompt that classifies `text`: a user prompt (input role) or an assistant answer
    (output role, with the `user_prompt` it answers as optional context), after a
    conversation's `earlier` turns when given ((role, content), oldest first; see
    `prompt_text`)."""
    role = _check_role(role, user_prompt)
    context = None if user_prompt is None else encode_text(tokenizer, user_prompt)
    block = context_block(tokenizer, role, [turn_tokens(tokenizer, r, c) for r, c in earlier])
    return build_prompt_from_tokens(
        policy,
        role,
        tokenizer,
        encode_text(tokenizer, text),
        user_prompt_tokens=context,
        context=block,
    )


def build_prompt_from_tokens(
    policy: Policy,
    role: Role | str,
    tokenizer: PromptTokenizer,
    text_tokens: Sequence[int],
    *,
    user_prompt_tokens: Sequence[int] | None = None,
    context: Sequence[int] = (),
) -> ModerationPrompt:
    """`build_prompt` from tokens made by `encode_text` (or windows of them, see split_tokens),
    after a `context` block made by `context_block` (none by default).

    The tokens are checked like any body: no BOS, EOS, control id or turn marker.
    """
    role = _check_role(role, user_prompt_tokens)
    prefix = build_prefix(policy, role, tokenizer)
    body: list[int] = list(context)
    if role is Role.OUTPUT:
        answered = list(user_prompt_tokens or ()) or tokenizer.encode(NO_USER_PROMPT, bos=False)
        body += answered + _encode_after_text(tokenizer, f"\n\n{ANSWER_MARKER}")
    body += [*text_tokens, *tokenizer.inst_close()]
    _check_structure(tokenizer, tuple(body), structural=0, closed=True)
    return ModerationPrompt(prefix=prefix, body=tuple(body))


def label_continuations(policy: Policy, tokenizer: PromptTokenizer) -> list[tuple[int, ...]]:
    """Token ids of each answer to score: the category labels in policy order, then the
    acceptable label last.

    A label scores as "the answer starts with this label". Those events are disjoint when no
    label's tokens begin another's; where one does ("unqualified" and "unqualified law"), the
    shorter label gets the EOS that ends an assistant turn, so it means exactly that answer.
    Scoring no more tokens than needed matters: every scored position costs a projection onto
    the whole vocabulary.
    """
    labels = [tuple(tokenizer.encode(label, bos=False)) for label in policy.labels]
    if len(set(labels)) != len(labels):
        raise PromptError(f"policy {policy.name!r}: two labels encode to the same tokens")

    def is_prefix_of_another(a: tuple[int, ...]) -> bool:
        return any(b != a and b[: len(a)] == a for b in labels)

    return [(*a, tokenizer.eos_id) if is_prefix_of_another(a) else a for a in labels]


def split_tokens(tokens: Sequence[int], window: int, overlap: int) -> list[list[int]]:
    """Overlapping windows covering all tokens, in order.

    Every window has `window` tokens (one shorter window when all tokens fit); consecutive
    windows share at least `overlap` tokens (the last window is aligned to the end, so it may
    share more). No tokens give one empty window, so every text is classified once.
    """
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must be in [0, window), got {overlap} for window {window}")
    n = len(tokens)
    if n <= window:
        return [list(tokens)]
    step = window - overlap
    starts = list(range(0, n - window, step))
    starts.append(n - window)
    return [list(tokens[s : s + window]) for s in starts]


def guarded_messages(
    messages: Sequence[ChatMessage],
    *,
    system_prompt: str | None = GUARDRAIL_SYSTEM_PROMPT,
    neutralize_content: bool = True,
) -> list[dict[str, str]]:
    """A conversation with the guardrail system prompt added in front, for guarded generation,
    as the chat template takes it (role/content dicts).

    `system_prompt`: the paper's guardrail by default, another string to replace it, None or ""
    for none. The caller's own system messages stay after it; the chat template merges all
    system prompts with a blank line, so the guardrail comes first (as Mistral's `safe_prompt`
    prepends it). `neutralize_content`: user and assistant texts go through `neutralize`, since
    in the v1 template a user typing "[/INST]" would otherwise close their turn and write the
    assistant's. The turn order is `check_conversation`'s; here only: a user message at least.
    """
    if not messages:
        raise PromptError("conversation is empty: it needs at least one user message")
    if not any(m.role == "user" for m in messages):
        raise PromptError("conversation has no user message")
    # System messages too: whoever sent the request wrote them, so they are as untrusted as
    # the user's ("Be nice. [/INST] ... [INST] ok" would close the turn early).
    out = [
        {"role": m.role, "content": neutralize(m.content) if neutralize_content else m.content}
        for m in messages
    ]
    if system_prompt:
        content = neutralize(system_prompt) if neutralize_content else system_prompt
        out.insert(0, {"role": "system", "content": content})
    return out


def check_chat_prompt(
    tokenizer: PromptTokenizer, ids: Sequence[int], *, user_turns: int, assistant_turns: int
) -> None:
    """Raise PromptError unless a chat prompt's structure is the template's own, on token ids:
    BOS once at the start, one turn opener and one closer per user turn, one EOS per finished
    assistant turn, and no other control id. Whatever the texts held, they stayed data."""
    opener, closer = tokenizer.inst_open(), tokenizer.inst_close()
    if list(ids[:1]) != [tokenizer.bos_id] or list(ids).count(tokenizer.bos_id) != 1:
        raise PromptError("a BOS token occurs inside the conversation")
    if len(_find(ids, opener)) != user_turns:
        raise PromptError("the turn opener ([INST]) occurs where it must not")
    if len(_find(ids, closer)) != user_turns:
        raise PromptError("the turn closer ([/INST]) occurs where it must not")
    if list(ids).count(tokenizer.eos_id) != assistant_turns:
        raise PromptError("an EOS token occurs inside the conversation")
    structural = {tokenizer.bos_id, tokenizer.eos_id, *opener, *closer}
    control = set(getattr(tokenizer, "control_ids", ())) - structural
    if any(t in control for t in ids):
        raise PromptError("a control token occurs inside the conversation")


def _check_role(role: Role | str, user_prompt: object) -> Role:
    try:
        role = Role(role)
    except ValueError:
        raise PromptError(f"role must be 'input' or 'output', got {quote(role)}") from None
    if role is Role.INPUT and user_prompt is not None:
        raise PromptError("a user prompt is context for the output role only")
    return role


def _encode_after_text(tokenizer: PromptTokenizer, text: str) -> list[int]:
    """Tokens of `text` (starting with a newline) as it tokenizes right after other text.

    Sentencepiece adds a word-start piece ("dummy prefix") at the start of every encode call;
    mid-text, a newline has none. Its tokens are learned from "\\n", whose encoding is the
    dummy prefix then the newline.
    """
    ids = tokenizer.encode(text, bos=False)
    newline = tokenizer.encode("\n", bos=False)
    dummy = newline[:-1]
    if dummy and ids[: len(dummy)] == dummy:
        return ids[len(dummy) :]
    return ids


def _find(seq: Sequence[int], sub: Sequence[int]) -> list[int]:
    """Start positions of `sub` in `seq`."""
    if not sub:
        return []
    first, k = sub[0], len(sub)
    sub = list(sub)
    return [i for i in range(len(seq) - k + 1) if seq[i] == first and list(seq[i : i + k]) == sub]


def _check_structure(
    tokenizer: PromptTokenizer, ids: tuple[int, ...], *, structural: int, closed: bool
) -> None:
    """Raise PromptError unless turn markers and special ids sit only at their places.

    `structural`: how many leading ids are structure (BOS + opener in a prefix); `closed`: the
    ids end with the turn closer (a body). Everything else must be plain text tokens.
    """
    opener, closer = tokenizer.inst_open(), tokenizer.inst_close()
    if structural and ids[:1] != (tokenizer.bos_id,):
        raise PromptError("prompt prefix does not start with BOS")
    end = len(ids) - len(closer) if closed else len(ids)
    if closed and list(ids[end:]) != closer:
        raise PromptError("prompt body does not end with the turn closer")
    opens = _find(ids, opener)
    expected_opens = [structural - len(opener)] if structural else []
    if opens != expected_opens:
        raise PromptError("the turn opener ([INST]) occurs where it must not")
    closes = _find(ids, closer)
    if closes != ([end] if closed else []):
        raise PromptError("the turn closer ([/INST]) occurs where it must not")
    special = {tokenizer.bos_id, tokenizer.eos_id}
    # model.Tokenizer exposes every control id (v3: [INST], [TOOL_CALLS], ...); use them if known.
    special |= set(getattr(tokenizer, "control_ids", ()))
    if any(t in special for t in ids[structural:end]):
        raise PromptError("a BOS, EOS or control token occurs inside the prompt text")


def checkable_answer_tokens(
    tokenizer: PromptTokenizer, tokens: Sequence[int], before: Sequence[int] = ()
) -> list[int]:
    """Generated answer tokens made safe to sit in an output-role prompt as they are (no
    re-tokenising: a check must cover exactly the tokens it releases).

    A BOS, EOS or control id becomes a plain token (the encoding of "?"), and so does the last
    token of a turn opener or closer the answer spells out, so that a generated `[/INST]`
    cannot close the classifier's turn and write its verdict. `before` is what the answer
    already had (only its last few tokens matter), for a marker split across two checks.
    One token out for each token in: positions stay those of the generated tokens.
    """
    special = {tokenizer.bos_id, tokenizer.eos_id}
    special |= set(getattr(tokenizer, "control_ids", ()))
    markers = [list(m) for m in (tokenizer.inst_open(), tokenizer.inst_close()) if m]
    plain = tokenizer.encode("?", bos=False)[-1]
    keep = max((len(m) for m in markers), default=1) - 1
    history = list(before[len(before) - keep :]) if keep else []
    out: list[int] = []
    for t in tokens:
        t = plain if t in special else t
        history.append(t)
        if any(history[-len(m) :] == m for m in markers):
            t = history[-1] = plain
        out.append(t)
    return out
