"""Self-reflection classification: prompt -> label log-probabilities -> decision.

Every label of the policy (and the acceptable label) is scored as the model's answer with the
engine's log-probabilities, never parsed from free text. The probabilities over the labels give
a score per category, the flagged decision, per-category decisions and the same scores summed
onto the paper's three categories. The instruction prefix of each (policy, role) is pre-filled
once and reused by every request.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from model import Engine, Prefix, ScoreRequest, Tokenizer
from moderation.core.builtin_policies import BUILTIN_POLICIES, DEFAULT_POLICY
from moderation.core.decision import Classification, ClassifyItem, check_threshold, decide
from moderation.core.errors import InvalidArgument
from moderation.core.limits import LONG_TEXT_MODES, ModelLimits
from moderation.core.policy import Policy, PolicyError, Role
from moderation.core.prompts import (
    PromptError,
    build_prefix,
    build_prompt_from_tokens,
    encode_text,
    label_continuations,
    split_tokens,
)


@dataclass(frozen=True)
class PlannedItem:
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
    Without an engine (`engine=None`, in the server's front process) it only plans, with the
    model's `limits`.
    """

    def __init__(
        self,
        engine: Engine | None,
        tokenizer: Tokenizer,
        *,
        model_id: str,
        limits: ModelLimits | None = None,
        policies: Mapping[str, Policy] | None = None,
        default_policy: str = DEFAULT_POLICY,
        threshold: float = 0.5,
        long_text: str = "reject",
        max_text_tokens: int | None = None,
        window_overlap: int | None = None,
        reuse_prefix: bool = True,
    ):
        if limits is None:
            if engine is None:
                raise ValueError("a classifier without an engine needs the model's limits")
            limits = ModelLimits.of(engine)
        self.engine = engine
        self.limits = limits
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.policies: dict[str, Policy] = {**BUILTIN_POLICIES, **(policies or {})}
        if default_policy not in self.policies:
            raise PolicyError(
                f"default policy {default_policy!r} is not one of {sorted(self.policies)}"
            )
        self.default_policy = default_policy
        check_threshold("threshold", threshold)
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
        context = self.limits.planning_context
        overhead = max(
            len(build_prefix(p, r, self.tokenizer)) for p in self.policies.values() for r in Role
        )
        return max(16, context - overhead - 64)

    # --------------------------------------------------------------- planning

    def policy(self, name: str | None) -> Policy:
        try:
            return self.policies[name or self.default_policy]
        except KeyError:
            raise InvalidArgument(
                "policy", f"unknown policy {name!r}; known: {', '.join(sorted(self.policies))}"
            ) from None

    def plan(self, item: ClassifyItem) -> PlannedItem:
        """Validate an item and build its prompt(s); InvalidArgument names the bad field."""
        if not isinstance(item.text, str) or not item.text.strip():
            raise InvalidArgument("text", "must not be empty")
        try:
            role = Role(item.role)
        except ValueError:
            raise InvalidArgument(
                "role", f"must be 'input' or 'output', got {item.role!r}"
            ) from None
        if role is Role.INPUT and item.user_prompt:
            raise InvalidArgument("prompt", "a user prompt is context for the output role only")
        policy = self.policy(item.policy)
        threshold = self.threshold if item.threshold is None else item.threshold
        check_threshold("threshold", threshold)
        for cid, value in item.category_thresholds.items():
            if cid not in policy.category_ids:
                raise InvalidArgument(
                    "category_thresholds",
                    f"policy {policy.name!r} has no category {cid!r}; "
                    f"its categories: {', '.join(policy.category_ids)}",
                )
            check_threshold(f"category_thresholds[{cid}]", value)
        text_tokens = encode_text(self.tokenizer, item.text)
        context = encode_text(self.tokenizer, item.user_prompt) if item.user_prompt else None
        n_context = len(context or ())
        if len(text_tokens) + n_context <= self.max_text_tokens:
            windows = [text_tokens]
        elif self.long_text == "reject":
            raise InvalidArgument(
                "text",
                f"{len(text_tokens) + n_context} tokens (text and prompt) exceed the limit of "
                f"{self.max_text_tokens}; long texts are rejected (long_text=reject)",
            )
        else:
            budget = self.max_text_tokens - n_context
            if budget < self.max_text_tokens // 2:
                # Windows must leave the text most of the room, or splitting makes no sense.
                raise InvalidArgument(
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
            raise InvalidArgument("text", str(exc)) from exc
        return PlannedItem(
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

    def run(self, planned: Sequence[PlannedItem]) -> list[Classification]:
        """Score already-planned items (the service plans at the door, runs in the worker)."""
        engine = self._engine()
        requests: list[ScoreRequest] = []
        for p in planned:
            labels = self._labels(p.policy)
            prefix = self._prefix(p.prefix) if self.reuse_prefix else None
            for body in p.bodies:
                prompt = body if prefix is not None else p.prefix + body
                requests.append(ScoreRequest(prompt, labels, prefix))
        # Only the labels' softmax is used, so relative log-probabilities suffice.
        scores = iter(engine.score_batch(requests, relative=True))
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

    def _engine(self) -> Engine:
        if self.engine is None:
            raise RuntimeError("this classifier only plans: the model runs in another process")
        return self.engine

    def _labels(self, policy: Policy) -> list[tuple[int, ...]]:
        if policy.name not in self._continuations:
            self._continuations[policy.name] = label_continuations(policy, self.tokenizer)
        return self._continuations[policy.name]

    def _prefix(self, tokens: tuple[int, ...]) -> Prefix:
        prefix = self._prefixes.get(tokens)
        if prefix is None:
            prefix = self._engine().prefill_prefix(tokens)
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
