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
from typing import Any

from model import Engine, Prefix, ScoreRequest, Tokenizer
from moderation.core.builtin_policies import DEFAULT_POLICY
from moderation.core.decision import Classification, ClassifyItem, decide
from moderation.core.generation import PreparedGeneration
from moderation.core.limits import ModelLimits
from moderation.core.planning import PlannedItem, Planner
from moderation.core.policy import Policy
from moderation.core.prompts import label_continuations


class Classifier:
    """Classifies texts with a loaded model; every call is one batched engine pass.

    Not thread-safe: the engine it drives is not. The service calls it from its model worker.
    It plans through `planner` (built from the keyword arguments and the engine's limits when
    not given).
    """

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        *,
        model_id: str,
        planner: Planner | None = None,
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
        self.planner = planner or Planner(
            tokenizer,
            ModelLimits.of(engine),
            policies=policies,
            default_policy=default_policy,
            threshold=threshold,
            long_text=long_text,
            max_text_tokens=max_text_tokens,
            window_overlap=window_overlap,
        )
        self.reuse_prefix = reuse_prefix
        self._prefixes: dict[tuple[int, ...], Prefix] = {}
        self._continuations: dict[str, list[tuple[int, ...]]] = {}

    # --------------------------------------------------------------- planning

    @property
    def policies(self) -> dict[str, Policy]:
        return self.planner.policies

    @property
    def default_policy(self) -> str:
        return self.planner.default_policy

    def policy(self, name: str | None) -> Policy:
        return self.planner.policy(name)

    def plan(self, item: ClassifyItem) -> PlannedItem:
        return self.planner.plan(item)

    def plan_output(self, prep: PreparedGeneration, answer: str) -> PlannedItem:
        """The output-moderation item of a generated answer (split into windows when long)."""
        return self.planner.plan_output(prep, answer)

    # -------------------------------------------------------------- running

    def classify(self, text: str = "", **kwargs: Any) -> Classification:
        """Classify one text (or `messages=`); keyword arguments are ClassifyItem fields."""
        return self.classify_many([ClassifyItem(text, **kwargs)])[0]

    def classify_many(self, items: Sequence[ClassifyItem]) -> list[Classification]:
        """Classify many texts in one batched engine pass; equal to one-by-one answers."""
        return self.run([self.plan(item) for item in items])

    def run(self, planned: Sequence[PlannedItem]) -> list[Classification]:
        """Score already-planned items (the service plans at the door, runs in the worker)."""
        engine = self.engine
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
            out.append(
                dataclasses.replace(
                    worst,
                    prompt_tokens=prompt_tokens,
                    context_tokens=p.context_tokens,
                    context_messages_dropped=p.context_messages_dropped,
                )
            )
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
            for prefix in self.planner.prefixes():
                self._prefix(prefix)
