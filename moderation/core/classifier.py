"""Self-reflection classification: prompt -> label log-probabilities -> decision.

Every label of the policy (and the acceptable label) is scored as the model's answer with the
engine's log-probabilities, never parsed from free text. The probabilities over the labels give
a score per category, the flagged decision, per-category decisions and the same scores summed
onto the paper's three categories. The instruction prefix of each (policy, role) is pre-filled
once and reused by every request: the server's start-up policies before it serves
(`warm_up`), any other policy's on its first request.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from model import Engine, Prefix, ScoreRequest, StreamCheck, Tokenizer
from moderation.core.decision import Classification, ClassifyItem, PlannedItem, decide
from moderation.core.generation import PreparedGeneration
from moderation.core.planning import Planner
from moderation.core.policy import Policy
from moderation.core.prompts import checkable_answer_tokens, label_continuations


@dataclass(eq=False)
class OutputStream:
    """An answer's output moderation while it is generated: the output-role prompt up to the
    answer so far, kept in an engine check stream (`Classifier.open_output_stream`)."""

    planned: PlannedItem  # its one body is the user prompt and "Answer:"
    stream_id: int
    checked: list[int] = field(default_factory=list)  # answer tokens the checks have covered

    @property
    def prompt_tokens(self) -> int:
        """Tokens of the prompt the last check classified (the turn closer included)."""
        return len(self.planned.prefix) + len(self.planned.bodies[0]) + len(self.checked)


class Classifier:
    """Classifies texts with a loaded model; every call is one batched engine pass.

    Not thread-safe: the engine it drives is not. The service calls it from its model worker.
    It plans through `planner` (`runtime.make_planner` maps the settings to one; tests build
    one from the engine's limits with `Planner(tokenizer, ModelLimits.of(engine), ...)`).
    """

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        planner: Planner,
        *,
        model_id: str,
        reuse_prefix: bool = True,
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.planner = planner
        self.reuse_prefix = reuse_prefix
        self._prefixes: dict[tuple[int, ...], Prefix] = {}
        self._continuations: dict[str, list[tuple[int, ...]]] = {}

    # --------------------------------------------------------------- planning

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

    # ----------------------------------------------------- checks as it grows

    def open_output_stream(self, prep: PreparedGeneration) -> OutputStream | None:
        """Start checking a generation's answer as it grows (`check_outputs`); None when the
        engine has no free slot now, or when the whole answer could not fit the context of a
        model without a sliding window (then check the answer once, at the end)."""
        planned = self.planner.plan_stream_output(prep)
        engine = self.engine
        body = planned.bodies[0]
        if engine.max_context is not None:
            # A check's pass holds every label token (their tree's nodes) after the answer.
            labels = sum(len(c) for c in self._labels(planned.policy))
            closer = len(self.tokenizer.inst_close())
            n = len(planned.prefix) + len(body) + prep.options.max_new_tokens + closer + labels
            if n > engine.max_context:
                return None
        return self.open_stream(planned)

    def open_stream(self, planned: PlannedItem) -> OutputStream | None:
        """Start checking an answer as it grows after `planned` (its one body ends where the
        answer begins); None when the engine has no free slot now."""
        if not self.engine.free_slots:
            return None
        body = planned.bodies[0]
        prefix = self._prefix(planned.prefix) if self.reuse_prefix else None
        prompt = body if prefix is not None else planned.prefix + body
        stream_id = self.engine.open_stream(prompt, prefix)
        return None if stream_id is None else OutputStream(planned, stream_id)

    def check_outputs(
        self,
        checks: Sequence[tuple[OutputStream, Sequence[int]]],
        *,
        run: Callable[[list[StreamCheck]], list[list[float]]] | None = None,
    ) -> list[Classification]:
        """Append each answer's new tokens (generated ids, made checkable) to its stream and
        classify the answer so far: one engine pass for all, costing the new tokens, the turn
        closer and the labels. Equal to classifying prefix + body + the answer tokens checked
        so far + closer from scratch.

        `run` scores the engine checks (relative scores) in place of `Engine.check_streams`:
        GuardedGenerator.step passes one that runs them in a generation step's pass."""
        closer = self.tokenizer.inst_close()
        requests: list[StreamCheck] = []
        for stream, tokens in checks:
            safe = checkable_answer_tokens(self.tokenizer, tokens, stream.checked)
            labels = self._labels(stream.planned.policy)
            requests.append(StreamCheck(stream.stream_id, safe, closer, labels))
        if run is None:
            scores = self.engine.check_streams(requests, relative=True)
        else:
            scores = run(requests)
        out: list[Classification] = []
        for (stream, _), request, s in zip(checks, requests, scores, strict=True):
            stream.checked.extend(request.tokens)
            p = stream.planned
            out.append(
                decide(
                    p.policy,
                    s,
                    threshold=p.threshold,
                    category_thresholds=p.category_thresholds,
                    model_id=self.model_id,
                    prompt_tokens=stream.prompt_tokens + len(closer),
                    windows=1,
                )
            )
        return out

    def close_output_stream(self, stream: OutputStream) -> None:
        """Free the stream's engine slot (safe to call twice)."""
        self.engine.close_stream(stream.stream_id)

    def _labels(self, policy: Policy) -> list[tuple[int, ...]]:
        if policy.name not in self._continuations:
            self._continuations[policy.name] = label_continuations(policy, self.tokenizer)
        return self._continuations[policy.name]

    def _prefix(self, tokens: tuple[int, ...]) -> Prefix:
        # Filled on first use without a lock: like the engine, the classifier runs on one
        # thread (the scheduler's), so two requests of a new policy, in one batch or in two
        # ticks, find the first one's prefix here and never pre-fill it twice.
        prefix = self._prefixes.get(tokens)
        if prefix is None:
            prefix = self.engine.prefill_prefix(tokens)
            self._prefixes[tokens] = prefix
        return prefix

    def warm_up(self, policies: Sequence[str] | None = None) -> list[str]:
        """Pre-fill the prefixes of `policies` (the planner's start-up policies by default)
        now rather than on their first request; returns the policies pre-filled."""
        if not self.reuse_prefix:
            return []
        names = self.planner.start_up_policies() if policies is None else list(policies)
        for prefix in self.planner.prefixes(names):
            self._prefix(prefix)
        return names

    @property
    def cached_prefixes(self) -> frozenset[tuple[int, ...]]:
        """The prefixes pre-filled so far, by their tokens."""
        return frozenset(self._prefixes)

    @property
    def prefix_cache_bytes(self) -> int:
        """Memory the pre-filled prefixes hold (outside the engine's memory plan)."""
        return sum(p.snapshot.nbytes for p in self._prefixes.values())

    def prefix_bytes(self, tokens: Sequence[int]) -> int:
        """What pre-filling `tokens` would hold: the rows a cache slot keeps of them."""
        plan = self.engine.memory
        return min(len(tokens), plan.tokens_per_slot) * plan.bytes_per_token
