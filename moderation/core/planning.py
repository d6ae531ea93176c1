"""Planning: a request validated and turned into prompt tokens, with the model's limits only.

The classifier and the guarded generator plan through a `Planner`; the server's front process
has only the planner (the model runs in a process of its own), built from the limits the model
process reports. No engine here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from model import Tokenizer
from model.errors import TokenizerError
from moderation.core.builtin_policies import BUILTIN_POLICIES, DEFAULT_POLICY
from moderation.core.decision import ClassifyItem, check_threshold
from moderation.core.errors import InvalidArgument
from moderation.core.generation import GenerateOptions, PreparedGeneration
from moderation.core.limits import LONG_TEXT_MODES, ModelLimits
from moderation.core.policy import GUARDRAIL_SYSTEM_PROMPT, Policy, PolicyError, Role
from moderation.core.prompts import (
    PromptError,
    build_prefix,
    build_prompt_from_tokens,
    encode_text,
    guarded_messages,
    split_tokens,
)
from moderation.core.thresholds import OperatingPoint, check_operating_point


@dataclass(frozen=True)
class PlannedItem:
    """An item turned into prompts (one per window) for one batched engine pass."""

    policy: Policy
    role: Role
    bodies: list[tuple[int, ...]]
    prefix: tuple[int, ...]
    threshold: float
    category_thresholds: Mapping[str, float]


class Planner:
    """Validates classification and generation requests and builds their prompts.

    InvalidArgument names the bad field. It holds no engine: only the tokenizer and limits.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        limits: ModelLimits,
        *,
        policies: Mapping[str, Policy] | None = None,
        default_policy: str = DEFAULT_POLICY,
        threshold: float = 0.5,
        long_text: str = "reject",
        max_text_tokens: int | None = None,
        window_overlap: int | None = None,
        max_new_tokens_limit: int = 4096,
        operating_points: Mapping[str, OperatingPoint] | None = None,
    ):
        self.tokenizer = tokenizer
        self.limits = limits
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
        self.max_new_tokens_limit = max_new_tokens_limit
        self.operating_points = dict(operating_points or {})
        for point in self.operating_points.values():
            check_operating_point(point, self.policies)

    def _default_max_text_tokens(self) -> int:
        # What the model can take: its context (the engine's limit without a sliding window),
        # less room for the longest policy prefix and label.
        context = self.limits.planning_context
        overhead = max(
            len(build_prefix(p, r, self.tokenizer)) for p in self.policies.values() for r in Role
        )
        return max(16, context - overhead - 64)

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
        category_thresholds = item.category_thresholds
        point = self.operating_points.get(policy.name)
        if point is not None and item.threshold is None and not category_thresholds:
            # The operator's operating point for this policy, unless the caller chose its own.
            threshold = self.threshold if point.threshold is None else point.threshold
            category_thresholds = point.category_thresholds
        check_threshold("threshold", threshold)
        for cid, value in category_thresholds.items():
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
            category_thresholds=dict(category_thresholds),
        )

    def prepare(
        self, messages: Sequence[Mapping[str, Any]], options: GenerateOptions
    ) -> PreparedGeneration:
        """Validate and build the prompt; InvalidArgument names the bad field."""
        if not 1 <= options.max_new_tokens <= self.max_new_tokens_limit:
            raise InvalidArgument(
                "max_new_tokens", f"must be between 1 and {self.max_new_tokens_limit}"
            )
        if not options.temperature >= 0.0:  # NaN fails too
            raise InvalidArgument("temperature", f"must be >= 0, got {options.temperature}")
        if not 0.0 < options.top_p <= 1.0:
            raise InvalidArgument("top_p", f"must be in (0, 1], got {options.top_p}")
        # Policy and threshold are checked even when only output moderation uses them.
        self.policy(options.policy)
        if options.threshold is not None:
            check_threshold("threshold", options.threshold)
        system = None
        if options.guardrail:
            system = options.system_prompt or GUARDRAIL_SYSTEM_PROMPT
        elif options.system_prompt:
            system = options.system_prompt
        try:
            conversation = guarded_messages(messages, system_prompt=system)
            prompt = self.tokenizer.encode_chat(conversation)
        except (PromptError, TokenizerError) as exc:
            raise InvalidArgument("messages", str(exc)) from exc
        if conversation[-1]["role"] != "user":
            raise InvalidArgument("messages", "the conversation must end with a user message")
        user_prompt = str(conversation[-1]["content"])
        input_item = None
        if options.moderate_input:
            input_item = ClassifyItem(
                user_prompt, role=Role.INPUT, policy=options.policy, threshold=options.threshold
            )
            self.plan(input_item)  # validate now: the prompt's length
        return PreparedGeneration(options, prompt, user_prompt, input_item)

    def prefixes(self) -> Iterator[tuple[int, ...]]:
        """The shared prefix of every (policy, role): what a classifier pre-fills once."""
        for policy in self.policies.values():
            for role in Role:
                yield build_prefix(policy, role, self.tokenizer)
