"""Between protobuf messages and the domain types; pure functions, no I/O."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from moderation.core.chat import ChatMessage
from moderation.core.decision import Classification, ClassifyItem
from moderation.core.generation import GenerateOptions, GenerationResult
from moderation.core.policy import Category, Policy, Role
from moderation.core.prompts import ANSWER_MARKER
from moderation.core.thresholds import LiveThresholds
from moderation.v1 import moderation_pb2 as pb

_ROLES = {pb.ROLE_UNSPECIFIED: Role.INPUT, pb.ROLE_INPUT: Role.INPUT, pb.ROLE_OUTPUT: Role.OUTPUT}
_FINISH = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "input_flagged": pb.FINISH_REASON_INPUT_FLAGGED,
    "output_flagged": pb.FINISH_REASON_OUTPUT_FLAGGED,
}


def classify_item(request: pb.ClassifyRequest) -> ClassifyItem:
    """The domain item; an unknown role number is passed through for the classifier to name.

    An unset role stays None (input for a text): with `messages` only a role actually set is
    an error."""
    role: Role | str | None = None
    if request.role != pb.ROLE_UNSPECIFIED:
        role = _ROLES.get(request.role, f"role number {request.role}")
    return ClassifyItem(
        text=request.text,
        role=role,
        user_prompt=request.prompt or None,
        policy=request.policy or None,
        threshold=request.threshold if request.HasField("threshold") else None,
        category_thresholds=dict(request.category_thresholds),
        messages=chat_messages(request.messages) or None,
    )


def answer_stream_item(request: pb.ModerateStreamOpen) -> ClassifyItem:
    """The output item a ModerateStream check is planned with (`Planner.plan_answer_stream`):
    a stand-in answer after the user prompt, or after the conversation so far."""
    messages = chat_messages(request.messages)
    common = {
        "policy": request.policy or None,
        "threshold": request.threshold if request.HasField("threshold") else None,
        "category_thresholds": dict(request.category_thresholds),
    }
    if messages:
        return ClassifyItem(
            user_prompt=request.prompt or None,
            messages=[*messages, ChatMessage("assistant", ANSWER_MARKER)],
            **common,  # type: ignore[arg-type]
        )
    return ClassifyItem(
        ANSWER_MARKER,
        role=Role.OUTPUT,
        user_prompt=request.prompt or None,
        **common,  # type: ignore[arg-type]
    )


def classify_response(result: Classification) -> pb.ClassifyResponse:
    return pb.ClassifyResponse(
        category=result.category,
        flagged=result.flagged,
        scores=result.scores,
        categories=result.categories,
        paper_scores=result.paper_scores,
        paper_category=result.paper_category,
        model=result.model,
        policy=result.policy,
        prompt_tokens=result.prompt_tokens,
        windows=result.windows,
        context_tokens=result.context_tokens,
        context_messages_dropped=result.context_messages_dropped,
    )


# GenerateStream's request carries GenerateRequest's fields (the same message on the wire).
GenerateMessage = pb.GenerateRequest | pb.GenerateStreamRequest


def generate_options(request: GenerateMessage, default_max_new_tokens: int) -> GenerateOptions:
    system_prompt = request.system_prompt if request.HasField("system_prompt") else None
    return GenerateOptions(
        max_new_tokens=request.max_new_tokens or default_max_new_tokens,
        temperature=request.temperature,
        top_p=request.top_p or 1.0,
        seed=request.seed if request.HasField("seed") else None,
        # An explicit empty system prompt means none at all.
        guardrail=not request.disable_guardrail and system_prompt != "",
        system_prompt=system_prompt or None,
        moderate_input=request.moderate_input,
        moderate_output=request.moderate_output,
        policy=request.policy or None,
        threshold=request.threshold if request.HasField("threshold") else None,
        stream_check_tokens=request.stream_check_tokens or None,  # 0: the server's default
    )


def chat_messages(messages: Iterable[pb.ChatMessage]) -> list[ChatMessage]:
    return [ChatMessage(m.role, m.content) for m in messages]


def chat_messages_pb(messages: Iterable[ChatMessage]) -> list[pb.ChatMessage]:
    return [pb.ChatMessage(role=m.role, content=m.content) for m in messages]


def generate_response(result: GenerationResult) -> pb.GenerateResponse:
    response = pb.GenerateResponse(
        text=result.text,
        refused=result.refused,
        refusal=result.refusal,
        finish_reason=_FINISH.get(result.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        model=result.model,
        released_tokens=result.released_tokens,
    )
    if result.input_moderation is not None:
        response.input_moderation.CopyFrom(classify_response(result.input_moderation))
    if result.output_moderation is not None:
        response.output_moderation.CopyFrom(classify_response(result.output_moderation))
    return response


def policy_info(
    policies: Sequence[Policy], live: Sequence[LiveThresholds] = ()
) -> list[pb.PolicyInfo]:
    """Policies as GetModelInfo lists them, with the thresholds a server applies to each."""
    by_policy = {t.policy: t for t in live}
    out = []
    for p in policies:
        info = pb.PolicyInfo(
            name=p.name,
            description=p.description,
            acceptable_label=p.acceptable_label,
            categories=[
                pb.CategoryInfo(
                    id=c.id,
                    label=c.label,
                    description=c.description,
                    paper_category=c.paper_category,
                )
                for c in p.categories
            ],
        )
        thresholds = by_policy.get(p.name)
        if thresholds is not None:
            info.threshold = thresholds.threshold
            info.category_thresholds.update(thresholds.category_thresholds)
            info.thresholds_source = thresholds.source
        out.append(info)
    return out


_ROLE_NUMBERS = {Role.INPUT: pb.ROLE_INPUT, Role.OUTPUT: pb.ROLE_OUTPUT}


def classify_request(item: ClassifyItem) -> pb.ClassifyRequest:
    """The request a remote client sends for an item (the inverse of classify_item)."""
    request = pb.ClassifyRequest(
        text=item.text,
        role=pb.ROLE_UNSPECIFIED if item.role is None else _ROLE_NUMBERS[Role(item.role)],
        prompt=item.user_prompt or "",
        messages=chat_messages_pb(item.messages or ()),
        policy=item.policy or "",
        category_thresholds=dict(item.category_thresholds),
    )
    if item.threshold is not None:
        request.threshold = item.threshold
    return request


def classification(response: pb.ClassifyResponse) -> Classification:
    """A remote result as the domain type (scores come back as float32)."""
    return Classification(
        category=response.category,
        flagged=response.flagged,
        scores=dict(response.scores),
        categories=dict(response.categories),
        paper_scores=dict(response.paper_scores),
        paper_category=response.paper_category,
        policy=response.policy,
        model=response.model,
        prompt_tokens=response.prompt_tokens,
        windows=response.windows,
        context_tokens=response.context_tokens,
        context_messages_dropped=response.context_messages_dropped,
    )


def policy_from_info(info: pb.PolicyInfo) -> Policy:
    return Policy(
        name=info.name,
        description=info.description,
        acceptable_label=info.acceptable_label,
        categories=tuple(
            Category(c.id, c.label, c.description, c.paper_category) for c in info.categories
        ),
    )
