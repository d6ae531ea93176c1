"""Planning: a request validated and turned into prompt tokens, with the model's limits only.

The classifier and the guarded generator plan through a `Planner`; the server's front process
has only the planner (the model runs in a process of its own), built from the limits the model
process reports. No engine here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence

from model import Tokenizer
from model.errors import TokenizerError
from moderation.core.builtin_policies import BUILTIN_POLICIES, DEFAULT_POLICY
from moderation.core.chat import ChatMessage, check_conversation
from moderation.core.decision import ClassifyItem, PlannedItem, check_threshold
from moderation.core.errors import InvalidArgument, quote
from moderation.core.generation import (
    DEFAULT_STREAM_CHECK_TOKENS,
    MAX_STREAM_CHECK_TOKENS,
    GenerateOptions,
    PreparedGeneration,
)
from moderation.core.limits import LONG_TEXT_MODES, ModelLimits
from moderation.core.policy import GUARDRAIL_SYSTEM_PROMPT, Policy, PolicyError, Role
from moderation.core.prompts import (
    ANSWER_MARKER,
    PromptError,
    build_prefix,
    build_prompt_from_tokens,
    check_chat_prompt,
    context_block,
    context_overhead,
    encode_text,
    guarded_messages,
    split_tokens,
    turn_tokens,
)
from moderation.core.text_safety import is_blank
from moderation.core.thresholds import (
    LiveThresholds,
    OperatingPoint,
    check_operating_point,
    live_thresholds,
)

MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 100.0


ALL_POLICIES = "all"
"""`warm_policies` naming this pre-fills every policy's prefixes at start-up."""


def check_warm_policies(names: Iterable[str], policies: Mapping[str, Policy]) -> None:
    """PolicyError unless every name is one of `policies` or ALL_POLICIES."""
    for name in names:
        if name != ALL_POLICIES and name not in policies:
            raise PolicyError(
                f"unknown policy to pre-fill {name!r}; known: {', '.join(sorted(policies))} "
                f"(or {ALL_POLICIES})"
            )


LONG_TEXT_HINT = (
    "split them into windows with --long-text split (the server: MODERATION_LONG_TEXT=split)"
)
"""What a rejected long text's error says to do: the option of the commands and the server."""


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
        stream_check_tokens: int = DEFAULT_STREAM_CHECK_TOKENS,
        operating_points: Mapping[str, OperatingPoint] | None = None,
        warm_policies: Sequence[str] = (),
    ):
        self.tokenizer = tokenizer
        self.limits = limits
        self.policies: dict[str, Policy] = {**BUILTIN_POLICIES, **(policies or {})}
        self.custom_policies = tuple(policies or ())  # the policy files' names
        if default_policy not in self.policies:
            raise PolicyError(
                f"default policy {default_policy!r} is not one of {sorted(self.policies)}"
            )
        self.default_policy = default_policy
        check_warm_policies(warm_policies, self.policies)
        self.warm_policies = tuple(warm_policies)
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
        self.stream_check_tokens = stream_check_tokens
        self.operating_points = dict(operating_points or {})
        for point in self.operating_points.values():
            check_operating_point(point, self.policies)

    def live_thresholds(self) -> list[LiveThresholds]:
        """Per policy, the thresholds of a request that sets none, and their source."""
        return live_thresholds(list(self.policies), self.threshold, self.operating_points)

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
                "policy", f"unknown policy {quote(name)}; known: {', '.join(sorted(self.policies))}"
            ) from None

    def plan(self, item: ClassifyItem, *, split: bool = False) -> PlannedItem:
        """Validate an item and build its prompt(s); InvalidArgument names the bad field.

        `split`: split a long text into windows even when long_text is "reject"."""
        if item.messages is not None:
            return self._plan_conversation(item, item.messages, split=split)
        if not isinstance(item.text, str) or is_blank(item.text):
            raise InvalidArgument("text", "must not be empty")
        try:
            role = Role(item.role or Role.INPUT)
        except ValueError:
            raise InvalidArgument(
                "role", f"must be 'input' or 'output', got {quote(item.role)}"
            ) from None
        if role is Role.INPUT and item.user_prompt:
            raise InvalidArgument("prompt", "a user prompt is context for the output role only")
        decision = self._decision(item)
        text_tokens = encode_text(self.tokenizer, item.text)
        context = encode_text(self.tokenizer, item.user_prompt) if item.user_prompt else None
        n_context = len(context or ())
        if len(text_tokens) + n_context <= self.max_text_tokens:
            windows = [text_tokens]
        elif self.long_text == "reject" and not split:
            raise InvalidArgument(
                "text",
                f"{len(text_tokens) + n_context} tokens (text and prompt) exceed the limit of "
                f"{self.max_text_tokens}; long texts are rejected: {LONG_TEXT_HINT}",
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
            windows = self._windows(text_tokens, budget)
        return self._planned(decision, role, windows, "text", user_prompt_tokens=context)

    def _plan_conversation(
        self, item: ClassifyItem, conversation: Sequence[ChatMessage], *, split: bool
    ) -> PlannedItem:
        """The last message classified after the earlier turns that fit, newest kept first.

        The last message has the room a text has (max_text_tokens) and follows the long-text
        policy; the earlier turns get what it leaves, or half the room when it is split. They
        are dropped oldest first, whole: a suffix of the conversation is kept. A leading
        system message is dropped like any turn: the most recent turns say what the last
        message replies to, and whoever wrote the system message wrote the rest too.
        """
        for name, given in (("text", item.text), ("prompt", item.user_prompt)):
            if given:
                raise InvalidArgument(name, "must not be set together with messages")
        if item.role is not None:
            raise InvalidArgument(
                "role",
                "must not be set together with messages: the last message's role says it "
                "(user: input, assistant: output)",
            )
        check_conversation(conversation, end=("user", "assistant"))
        messages = [(m.role, m.content) for m in conversation]
        last = len(messages) - 1
        speaker, text = messages[last]
        role = Role.INPUT if speaker == "user" else Role.OUTPUT
        decision = self._decision(item)
        tok, limit = self.tokenizer, self.max_text_tokens
        text_tokens = encode_text(tok, text)
        if len(text_tokens) <= limit:
            room = limit - len(text_tokens)
        elif self.long_text == "reject" and not split:
            raise InvalidArgument(
                f"messages[{last}].content",
                f"{len(text_tokens)} tokens exceed the limit of {limit}; long texts are "
                f"rejected: {LONG_TEXT_HINT}",
            )
        else:
            room = limit // 2
        earlier = messages[:last]
        # For an answer, the user message it replies to fills the output layout's user prompt.
        answered = encode_text(tok, earlier.pop()[1]) if role is Role.OUTPUT else None
        kept: list[list[int]] = []
        if answered is not None and len(answered) > room:
            answered = None
        else:
            used = len(answered or ()) + context_overhead(tok, role)
            for r, content in reversed(earlier):  # newest first; older ones are not encoded
                turn = turn_tokens(tok, r, content)
                if used + len(turn) > room:
                    break
                used += len(turn)
                kept.append(turn)
            kept.reverse()
        block = context_block(tok, role, kept)
        n_context = len(block) + len(answered or ())
        dropped = last - len(kept) - (answered is not None)
        if len(text_tokens) + n_context <= limit:
            windows = [text_tokens]
        else:
            windows = self._windows(text_tokens, limit - n_context)
        return self._planned(
            decision,
            role,
            windows,
            "messages",
            user_prompt_tokens=answered,
            context=block,
            dropped=dropped,
        )

    def _planned(
        self,
        decision: tuple[Policy, float, Mapping[str, float]],
        role: Role,
        windows: Sequence[Sequence[int]],
        field: str,
        *,
        user_prompt_tokens: Sequence[int] | None,
        context: Sequence[int] = (),
        dropped: int = 0,
    ) -> PlannedItem:
        """The item of a text's windows, each a body after the same context (a conversation's
        block, then the user prompt an answer replies to); a bad body names `field`."""
        policy, threshold, category_thresholds = decision
        try:
            bodies = [
                build_prompt_from_tokens(
                    policy,
                    role,
                    self.tokenizer,
                    w,
                    user_prompt_tokens=user_prompt_tokens,
                    context=context,
                ).body
                for w in windows
            ]
        except PromptError as exc:
            raise InvalidArgument(field, str(exc)) from exc
        return PlannedItem(
            policy=policy,
            role=role,
            bodies=bodies,
            prefix=build_prefix(policy, role, self.tokenizer),
            threshold=threshold,
            category_thresholds=dict(category_thresholds),
            context_tokens=len(context) + len(user_prompt_tokens or ()),
            context_messages_dropped=dropped,
        )

    def _decision(self, item: ClassifyItem) -> tuple[Policy, float, Mapping[str, float]]:
        """The policy and thresholds an item is decided with (the operator's operating point
        for the policy unless the caller chose its own)."""
        policy = self.policy(item.policy)
        threshold = self.threshold if item.threshold is None else item.threshold
        category_thresholds = item.category_thresholds
        point = self.operating_points.get(policy.name)
        if point is not None and item.threshold is None and not category_thresholds:
            threshold = self.threshold if point.threshold is None else point.threshold
            category_thresholds = point.category_thresholds
        check_threshold("threshold", threshold)
        for cid, value in category_thresholds.items():
            if cid not in policy.category_ids:
                raise InvalidArgument(
                    "category_thresholds",
                    f"policy {policy.name!r} has no category {quote(cid)}; "
                    f"its categories: {', '.join(policy.category_ids)}",
                )
            check_threshold(f"category_thresholds[{cid}]", value)
        return policy, threshold, category_thresholds

    def _windows(self, tokens: list[int], budget: int) -> list[list[int]]:
        return split_tokens(tokens, budget, min(self.window_overlap, budget - 1))

    def prepare(
        self, messages: Sequence[ChatMessage], options: GenerateOptions
    ) -> PreparedGeneration:
        """Validate and build the prompt; InvalidArgument names the bad field.

        Everything that can refuse a request is decided here, before any model work: the
        whole prompt and max_new_tokens must fit the engine's context, and with output
        moderation the answer must be checkable next to the user prompt.
        """
        if not 1 <= options.max_new_tokens <= self.max_new_tokens_limit:
            raise InvalidArgument(
                "max_new_tokens", f"must be between 1 and {self.max_new_tokens_limit}"
            )
        t = options.temperature
        if not (t == 0.0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):  # NaN fails too
            # Below ~0.01 logits / t overflow to inf and the sampling step fails for every
            # sequence of the batch (vLLM clamps to 0.01 for the same reason).
            raise InvalidArgument(
                "temperature",
                f"must be 0 (greedy) or between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}, got {t}",
            )
        if not 0.0 < options.top_p <= 1.0:
            raise InvalidArgument("top_p", f"must be in (0, 1], got {options.top_p}")
        # Policy and threshold are checked even when only output moderation uses them.
        self.policy(options.policy)
        if options.threshold is not None:
            check_threshold("threshold", options.threshold)
        check_conversation(messages)
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
        roles = [m["role"] for m in conversation]
        try:
            check_chat_prompt(
                self.tokenizer,
                prompt,
                user_turns=roles.count("user"),
                assistant_turns=roles.count("assistant"),
            )
        except PromptError as exc:
            field = "system_prompt" if options.system_prompt else "messages"
            raise InvalidArgument(field, str(exc)) from exc
        context = self.limits.context
        if len(prompt) + options.max_new_tokens > context:
            raise InvalidArgument(
                "messages",
                f"the prompt takes {len(prompt)} tokens (system prompt and messages); with "
                f"max_new_tokens {options.max_new_tokens} that exceeds the model's context of "
                f"{context} tokens (max_context)",
            )
        user_prompt = conversation[-1]["content"]
        last = len(messages) - 1
        input_planned = None
        if options.moderate_input:
            item = ClassifyItem(
                user_prompt, role=Role.INPUT, policy=options.policy, threshold=options.threshold
            )
            try:  # planned once, here: the model's thread runs it as it is
                input_planned = self.plan(item)
            except InvalidArgument as exc:
                raise InvalidArgument(f"messages[{last}].content", exc.message) from exc
        if options.moderate_output:
            self._check_output_room(user_prompt, options.max_new_tokens, last)
        every = options.stream_check_tokens
        if every is None:
            every = self.stream_check_tokens
        elif not 1 <= every <= MAX_STREAM_CHECK_TOKENS:
            raise InvalidArgument(
                "stream_check_tokens",
                f"must be between 1 and {MAX_STREAM_CHECK_TOKENS} (0 = the server's default "
                f"{self.stream_check_tokens}), got {every}",
            )
        options = dataclasses.replace(options, stream_check_tokens=every)
        return PreparedGeneration(options, prompt, user_prompt, input_planned)

    def _check_output_room(self, user_prompt: str, max_new_tokens: int, last: int) -> None:
        """Refuse now a generation whose answer could not be moderated next to its user prompt
        (`plan_output` splits a long answer; the user prompt must leave it half the room)."""
        n_context = len(encode_text(self.tokenizer, user_prompt))
        if n_context > self.max_text_tokens // 2:
            raise InvalidArgument(
                f"messages[{last}].content",
                f"{n_context} tokens: with moderate_output the last user message may take at "
                f"most {self.max_text_tokens // 2} tokens (half of a classification prompt, "
                "the rest is for the answer)",
            )

    def plan_output(self, prep: PreparedGeneration, answer: str) -> PlannedItem:
        """The output-moderation item of a generated answer: split into windows when long,
        whatever long_text says (the request was accepted; its answer must be checkable)."""
        return self.plan(prep.output_item(answer), split=True)

    def plan_stream_output(self, prep: PreparedGeneration) -> PlannedItem:
        """The output-moderation prompt of an answer checked while it is generated: its one
        body is the user prompt and the "Answer:" marker; the answer's own tokens and the turn
        closer follow it, check by check (`Classifier.open_output_stream`)."""
        # Policy and thresholds are resolved as for any output item (the text is a stand-in).
        planned = self.plan(prep.output_item(ANSWER_MARKER), split=True)
        context = encode_text(self.tokenizer, prep.user_prompt) if prep.user_prompt else None
        body = build_prompt_from_tokens(
            planned.policy, Role.OUTPUT, self.tokenizer, [], user_prompt_tokens=context
        ).body
        closer = len(self.tokenizer.inst_close())
        return dataclasses.replace(planned, bodies=[body[:-closer]])

    def plan_answer_stream(self, item: ClassifyItem) -> tuple[PlannedItem, int]:
        """The output-moderation prompt of an answer that arrives in pieces (ModerateStream),
        and how many answer tokens it may take.

        `item` is the answer's output item with a stand-in text (ANSWER_MARKER) as its text
        (or as the content of its last, assistant, message): it is planned as any item
        (policy, thresholds, the user prompt or the earlier turns that fit), then its body
        ends before the answer's tokens and the turn closer, which the checks append. The
        answer may take what a text may take beside that context without being split, so that
        `Classify` of the complete answer in the same context keeps the same turns and scores
        the same prompt."""
        planned = self.plan(item)
        text = item.messages[-1].content if item.messages else item.text
        standin = len(encode_text(self.tokenizer, text)) + len(self.tokenizer.inst_close())
        body = planned.bodies[0][:-standin]
        return dataclasses.replace(planned, bodies=[body]), max(
            0, self.max_text_tokens - planned.context_tokens
        )

    def start_up_policies(self) -> list[str]:
        """The policies whose prefixes a server pre-fills before serving: the default, the
        policy files', those with an operating point (thresholds files) and `warm_policies`
        (every policy with "all"). Any other policy's prefixes are pre-filled on first use: a
        built-in policy no caller uses holds no memory outside the engine's plan."""
        if ALL_POLICIES in self.warm_policies:
            return list(self.policies)
        named = [self.default_policy, *self.custom_policies, *self.operating_points]
        return list(dict.fromkeys([*named, *self.warm_policies]))

    def prefixes(self, policies: Iterable[str] | None = None) -> Iterator[tuple[int, ...]]:
        """The shared prefix of each (policy, role) of `policies` (all by default): what a
        classifier pre-fills once."""
        for name in self.policies if policies is None else policies:
            for role in Role:
                yield build_prefix(self.policies[name], role, self.tokenizer)
