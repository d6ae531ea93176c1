"""Self-reflection classification: prompt -> label log-probabilities -> decision.

Every label of the policy (and the acceptable label) is scored as the model's answer with the
engine's log-probabilities, never parsed from free text. The probabilities over the labels give
a score per category, the flagged decision, per-category decisions and the same scores summed
onto the paper's three categories. The instruction prefix of each (policy, role) is pre-filled
once and reused by every request.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from model import Engine, Prefix, ScoreRequest, Tokenizer
from moderation.policy import (
    ACCEPTABLE_ID,
    BUILTIN_POLICIES,
    DEFAULT_POLICY,
    PAPER_CATEGORY_IDS,
    Policy,
    PolicyError,
    Role,
)
from moderation.prompts import (
    PromptError,
    build_prefix,
    build_prompt_from_tokens,
    encode_text,
    label_continuations,
    split_tokens,
)

LONG_TEXT_MODES = ("reject", "split")


class ClassificationError(ValueError):
    """A classification request is invalid; `field` names the offending request field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class ClassifyItem:
    """One text to classify and how."""

    text: str
    role: Role | str = Role.INPUT
    user_prompt: str | None = None  # context for output moderation
    policy: str | None = None  # None = the classifier's default
    threshold: float | None = None  # None = the classifier's default
    category_thresholds: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Classification:
    """A decision a caller can act on: category, flagged, per-category scores and booleans."""

    category: str  # the most probable category id, or "acceptable"
    flagged: bool
    scores: dict[str, float]  # category id -> probability, "acceptable" included; sums to 1
    categories: dict[str, bool]  # category id -> flagged
    paper_scores: dict[str, float]  # the paper's three categories + "acceptable"
    paper_category: str
    policy: str
    model: str
    prompt_tokens: int  # tokens of the prompt(s) scored, shared prefix included
    windows: int = 1  # >1 when a long text was split; the most severe window is reported

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
    return Classification(
        category=max(scores, key=lambda c: scores[c]),
        flagged=flagged,
        scores=scores,
        categories=categories,
        paper_scores=paper_scores,
        paper_category=max(paper_scores, key=lambda c: paper_scores[c]),
        policy=policy.name,
        model=model_id,
        prompt_tokens=prompt_tokens,
        windows=windows,
    )


@dataclass(frozen=True)
class _Planned:
    """An item turned into prompts (one per window) for one batched engine pass."""

    policy: Policy
    role: Role
    bodies: list[tuple[int, ...]]
    prefix: tuple[int, ...]
    threshold: float
    category_thresholds: Mapping[str, float]


class Classifier:
    """Classifies texts with a loaded model; every call is one batched engine pass.

    Not thread-safe: the engine it drives is not. The service calls it from its model worker.
    """

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        *,
        model_id: str,
        policies: Mapping[str, Policy] | None = None,
        default_policy: str = DEFAULT_POLICY,
        threshold: float = 0.5,
        long_text: str = "reject",
        max_text_tokens: int | None = None,
        window_overlap: int | None = None,
        reuse_prefix: bool = True,
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.policies: dict[str, Policy] = {**BUILTIN_POLICIES, **(policies or {})}
        if default_policy not in self.policies:
            raise PolicyError(
                f"default policy {default_policy!r} is not one of {sorted(self.policies)}"
            )
        self.default_policy = default_policy
        _check_threshold("threshold", threshold)
        self.threshold = threshold
        if long_text not in LONG_TEXT_MODES:
            raise ValueError(f"long_text must be one of {LONG_TEXT_MODES}, got {long_text!r}")
        self.long_text = long_text
        self.max_text_tokens = max_text_tokens or self._default_max_text_tokens()
        self.window_overlap = (
            window_overlap if window_overlap is not None else self.max_text_tokens // 8
        )
        self.reuse_prefix = reuse_prefix
        self._prefixes: dict[tuple[int, ...], Prefix] = {}
        self._continuations: dict[str, list[tuple[int, ...]]] = {}

    def _default_max_text_tokens(self) -> int:
        # What the model can take: its context (the engine's limit without a sliding window),
        # less room for the longest policy prefix and label.
        context = self.engine.max_context or min(self.engine.args.max_seq_len, 8192)
        overhead = max(
            len(build_prefix(p, r, self.tokenizer)) for p in self.policies.values() for r in Role
        )
        return max(16, context - overhead - 64)

    # --------------------------------------------------------------- planning

    def policy(self, name: str | None) -> Policy:
        try:
            return self.policies[name or self.default_policy]
        except KeyError:
            raise ClassificationError(
                "policy", f"unknown policy {name!r}; known: {', '.join(sorted(self.policies))}"
            ) from None

    def plan(self, item: ClassifyItem) -> _Planned:
        """Validate an item and build its prompt(s); ClassificationError names the bad field."""
        if not isinstance(item.text, str) or not item.text.strip():
            raise ClassificationError("text", "must not be empty")
        try:
            role = Role(item.role)
        except ValueError:
            raise ClassificationError(
                "role", f"must be 'input' or 'output', got {item.role!r}"
            ) from None
        if role is Role.INPUT and item.user_prompt:
            raise ClassificationError("prompt", "a user prompt is context for the output role only")
        policy = self.policy(item.policy)
        threshold = self.threshold if item.threshold is None else item.threshold
        _check_threshold("threshold", threshold)
        for cid, value in item.category_thresholds.items():
            if cid not in policy.category_ids:
                raise ClassificationError(
                    "category_thresholds",
                    f"policy {policy.name!r} has no category {cid!r}; "
                    f"its categories: {', '.join(policy.category_ids)}",
                )
            _check_threshold(f"category_thresholds[{cid}]", value)
        text_tokens = encode_text(self.tokenizer, item.text)
        context = encode_text(self.tokenizer, item.user_prompt) if item.user_prompt else None
        n_context = len(context or ())
        if len(text_tokens) + n_context <= self.max_text_tokens:
            windows = [text_tokens]
        elif self.long_text == "reject":
            raise ClassificationError(
                "text",
                f"{len(text_tokens) + n_context} tokens (text and prompt) exceed the limit of "
                f"{self.max_text_tokens}; long texts are rejected (long_text=reject)",
            )
        else:
            budget = self.max_text_tokens - n_context
            if budget < self.max_text_tokens // 2:
                # Windows must leave the text most of the room, or splitting makes no sense.
                raise ClassificationError(
                    "prompt",
                    f"the user prompt takes {n_context} of the {self.max_text_tokens} tokens "
                    "a prompt may have; shorten it",
                )
            windows = split_tokens(text_tokens, budget, min(self.window_overlap, budget - 1))
        try:
            bodies = [
                build_prompt_from_tokens(
                    policy, role, self.tokenizer, w, user_prompt_tokens=context
                ).body
                for w in windows
            ]
        except PromptError as exc:
            raise ClassificationError("text", str(exc)) from exc
        return _Planned(
            policy=policy,
            role=role,
            bodies=bodies,
            prefix=build_prefix(policy, role, self.tokenizer),
            threshold=threshold,
            category_thresholds=dict(item.category_thresholds),
        )

    # -------------------------------------------------------------- running

    def classify(self, text: str, **kwargs: Any) -> Classification:
        """Classify one text; keyword arguments are ClassifyItem fields."""
        return self.classify_many([ClassifyItem(text, **kwargs)])[0]

    def classify_many(self, items: Sequence[ClassifyItem]) -> list[Classification]:
        """Classify many texts in one batched engine pass; equal to one-by-one answers."""
        return self.run([self.plan(item) for item in items])

    def run(self, planned: Sequence[_Planned]) -> list[Classification]:
        """Score already-planned items (the service plans at the door, runs in the worker)."""
        requests: list[ScoreRequest] = []
        for p in planned:
            labels = self._labels(p.policy)
            prefix = self._prefix(p.prefix) if self.reuse_prefix else None
            for body in p.bodies:
                prompt = body if prefix is not None else p.prefix + body
                requests.append(ScoreRequest(prompt, labels, prefix))
        # Only the labels' softmax is used, so relative log-probabilities suffice.
        scores = iter(self.engine.score_batch(requests, relative=True))
        out: list[Classification] = []
        for p in planned:
            results = [
                decide(
                    p.policy,
                    next(scores),
                    threshold=p.threshold,
                    category_thresholds=p.category_thresholds,
                    model_id=self.model_id,
                    prompt_tokens=len(p.prefix) + len(body),
                    windows=len(p.bodies),
                )
                for body in p.bodies
            ]
            # The most severe window speaks for a split text.
            worst = max(results, key=lambda r: r.unsafe_probability)
            prompt_tokens = sum(r.prompt_tokens for r in results)
            out.append(_with_tokens(worst, prompt_tokens))
        return out

    def _labels(self, policy: Policy) -> list[tuple[int, ...]]:
        if policy.name not in self._continuations:
            self._continuations[policy.name] = label_continuations(policy, self.tokenizer)
        return self._continuations[policy.name]

    def _prefix(self, tokens: tuple[int, ...]) -> Prefix:
        prefix = self._prefixes.get(tokens)
        if prefix is None:
            prefix = self.engine.prefill_prefix(tokens)
            self._prefixes[tokens] = prefix
        return prefix

    def warm_up(self) -> None:
        """Pre-fill every policy's prefixes now rather than on the first request."""
        if self.reuse_prefix:
            for policy in self.policies.values():
                for role in Role:
                    self._prefix(build_prefix(policy, role, self.tokenizer))


def _with_tokens(result: Classification, prompt_tokens: int) -> Classification:
    return dataclasses.replace(result, prompt_tokens=prompt_tokens)


def _check_threshold(name: str, value: float) -> None:
    if not isinstance(value, int | float) or math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ClassificationError(name, f"must be between 0 and 1, got {value!r}")
