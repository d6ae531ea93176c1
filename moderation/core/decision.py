"""A classification request and its decision: label log-probabilities -> per-category scores,
flagged, per-category booleans and the paper's three categories. Pure functions, no model."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from moderation.core.chat import ChatMessage
from moderation.core.errors import InvalidArgument, quote
from moderation.core.policy import ACCEPTABLE_ID, PAPER_CATEGORY_IDS, Policy, Role


@dataclass(frozen=True)
class ClassifyItem:
    """One text, or the last message of a conversation, to classify and how.

    `messages` (a conversation, checked by `core.chat.check_conversation`) is the alternative
    to `text`:
    its last message is classified in the context of the earlier ones, and `text`,
    `user_prompt` and `role` must then be left unset ("", None, None).
    """

    text: str = ""
    role: Role | str | None = None  # None = input for a text; from the last message otherwise
    user_prompt: str | None = None  # context for output moderation
    policy: str | None = None  # None = the classifier's default
    threshold: float | None = None  # None = the classifier's default
    category_thresholds: Mapping[str, float] = field(default_factory=dict)
    messages: Sequence[ChatMessage] | None = None


@dataclass(frozen=True)
class PlannedItem:
    """An item turned into prompts (one per window) for one batched engine pass."""

    policy: Policy
    role: Role
    bodies: list[tuple[int, ...]]
    prefix: tuple[int, ...]
    threshold: float
    category_thresholds: Mapping[str, float]
    context_tokens: int = 0  # tokens of context in each body: the user prompt, earlier turns
    context_messages_dropped: int = 0  # a conversation's earlier turns that did not fit


@dataclass(frozen=True)
class Classification:
    """A decision a caller can act on: category, flagged, per-category scores and booleans."""

    category: str  # the most probable category id, or "acceptable"
    flagged: bool
    scores: dict[str, float]  # category id -> probability, "acceptable" included; sums to 1
    categories: dict[str, bool]  # category id -> flagged
    paper_scores: dict[str, float]  # the paper's three categories + "acceptable" (sums)
    # The paper category `category` rolls up into ("acceptable" for "acceptable"): the two
    # never disagree. (The most probable key of paper_scores can differ, when a paper
    # category's mass is spread over several categories; paper_scores has it for who wants it.)
    paper_category: str
    policy: str
    model: str
    prompt_tokens: int  # tokens of the prompt(s) scored, shared prefix included
    windows: int = 1  # >1 when a long text was split; the most severe window is reported
    context_tokens: int = 0  # tokens of the context kept: the user prompt, or earlier turns
    context_messages_dropped: int = 0  # earlier turns dropped, oldest first, to fit

    @property
    def unsafe_probability(self) -> float:
        return 1.0 - self.scores[ACCEPTABLE_ID]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(
    policy: Policy,
    logprobs: Sequence[float],
    *,
    threshold: float,
    category_thresholds: Mapping[str, float],
    model_id: str,
    prompt_tokens: int,
    windows: int = 1,
) -> Classification:
    """Turn label log-probabilities (policy.labels order, acceptable last) into a decision.

    flagged: P(not acceptable) >= threshold, and then the most probable harmful category is the
    flagged one. With category_thresholds, only those categories are filtered: each is flagged
    when it reaches its own threshold, and the text when any of them is.
    """
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    total = sum(weights)
    ids = [*policy.category_ids, ACCEPTABLE_ID]
    scores = {cid: w / total for cid, w in zip(ids, weights, strict=True)}
    if category_thresholds:
        categories = {
            c: c in category_thresholds and scores[c] >= category_thresholds[c]
            for c in policy.category_ids
        }
        flagged = any(categories.values())
    else:
        flagged = 1.0 - scores[ACCEPTABLE_ID] >= threshold
        # The harmful mass can be spread over several categories; name the most probable one.
        worst = max(policy.category_ids, key=lambda c: scores[c])
        categories = {c: flagged and c == worst for c in policy.category_ids}
    paper_scores = dict.fromkeys((*PAPER_CATEGORY_IDS, ACCEPTABLE_ID), 0.0)
    for cat in policy.categories:
        paper_scores[cat.paper_category] += scores[cat.id]
    paper_scores[ACCEPTABLE_ID] = scores[ACCEPTABLE_ID]
    category = max(scores, key=lambda c: scores[c])
    return Classification(
        category=category,
        flagged=flagged,
        scores=scores,
        categories=categories,
        paper_scores=paper_scores,
        paper_category=paper_category_of(policy, category),
        policy=policy.name,
        model=model_id,
        prompt_tokens=prompt_tokens,
        windows=windows,
    )


def paper_category_of(policy: Policy, category: str) -> str:
    """The paper category a category id rolls up into; "acceptable" stays itself."""
    return ACCEPTABLE_ID if category == ACCEPTABLE_ID else policy.category(category).paper_category


def check_threshold(name: str, value: float) -> None:
    if not isinstance(value, int | float) or math.isnan(value) or not 0.0 <= value <= 1.0:
        raise InvalidArgument(name, f"must be between 0 and 1, got {quote(value)}")
