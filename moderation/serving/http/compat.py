"""OpenAI's and Mistral's moderation APIs, answered by ClassifyBatch.

`POST /v1/moderations` (OpenAI's shape; Mistral's raw-text moderation has the same request):
    {"model": str?, "input": str | [str | {"type": "text", "text": str}]}
 -> {"id": "modr-<request id>", "model": <served model>, "policy": <policy applied>,
     "results": [{"flagged", "categories": {id: bool}, "category_scores": {id: float},
                  "category_applied_input_types": {id: ["text"]}}]}

`POST /v1/chat/moderations` (Mistral's shape):
    {"model": str?, "input": [message, ...] | [[message, ...], ...]}
 -> {"id": <request id>, "model", "policy", "results": [{"flagged", "categories",
     "category_scores"}]}, one result per conversation: its last message, classified in the
     context of the earlier ones (ClassifyRequest.messages).

`model` chooses the policy: a policy name ("paper", "openai", "mistral" or one loaded from a
file); an OpenAI moderation model name (omni-moderation-latest...) the `openai` policy, a Mistral
one (mistral-moderation-latest...) the `mistral` policy; a served model name or nothing, the
route's own policy: `openai` on /v1/moderations, `mistral` on /v1/chat/moderations (see
`names`). Anything else is 404 model_not_found, as OpenAI answers a model it does not serve.

Category names are the policy's category ids (for `openai` OpenAI's own names, so that the SDK's
typed fields are filled) plus the paper's three (illegal_activities,
hateful_harassing_violent, unqualified_advice; the same keys for the paper policy). Scores are
ClassifyResponse.scores and paper_scores without "acceptable": one probability distribution over
the policy's categories and acceptable, so they are not independent as OpenAI's are.
`categories[c]` is ClassifyResponse.categories (for a paper category: any of the policy's
categories that roll up into it), `flagged` is ClassifyResponse.flagged.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message

from moderation.api import convert
from moderation.core.chat import chat_messages
from moderation.core.errors import InvalidArgument, quote
from moderation.serving.http.bodies import Limits, too_many
from moderation.serving.http.names import MISTRAL_POLICY, OPENAI_POLICY, ServedNames, vendor_policy
from moderation.serving.http.status import CallError, caller_field
from moderation.v1 import moderation_pb2 as pb

Call = Callable[[str, Message], Awaitable[Any]]
"""Calls a ModerationService method in-process: (method name, request) -> response."""

PAPER_CATEGORIES = ("illegal_activities", "hateful_harassing_violent", "unqualified_advice")


def _bad(field: str, message: str) -> CallError:
    return CallError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}", field)


def _check(error: CallError | None) -> None:
    if error is not None:
        raise error


def _object(body: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise CallError(grpc.StatusCode.INVALID_ARGUMENT, "the request body must be a JSON object")
    for key in body:
        if key not in allowed:
            raise _bad(caller_field(key), "unknown field")
    if "input" not in body:
        raise _bad("input", "is required")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", "must be a string")
    return body


def select_policy(
    model: str | None, info: pb.GetModelInfoResponse, names: ServedNames, route_policy: str
) -> pb.PolicyInfo:
    """The policy a request's `model` selects (see the module's docstring)."""
    policies = {p.name: p for p in info.policies}
    if model in (None, "") or names.serves(model, info.model):
        name = route_policy
    elif model in policies:
        name = model
    else:
        name = vendor_policy(model) or ""
    if name not in policies:
        served = ", ".join(names.names(info.model))
        raise CallError(
            grpc.StatusCode.NOT_FOUND,
            f"The model {quote(model) if model else route_policy} does not exist: use a policy "
            f"({', '.join(policies)}), the served model ({served}), an OpenAI or Mistral "
            f"moderation model name, or no model (the {route_policy} policy)",
            "model",
        )
    return policies[name]


def result_fields(r: pb.ClassifyResponse, policy: pb.PolicyInfo) -> dict[str, Any]:
    categories = {c.id: bool(r.categories.get(c.id, False)) for c in policy.categories}
    scores = {c.id: float(r.scores.get(c.id, 0.0)) for c in policy.categories}
    for paper in PAPER_CATEGORIES:
        rolled = [c.id for c in policy.categories if c.paper_category == paper]
        categories[paper] = any(categories[c] for c in rolled)
        scores[paper] = float(r.paper_scores.get(paper, 0.0))
    return {"flagged": r.flagged, "categories": categories, "category_scores": scores}


def _renamed(exc: CallError, rename: Callable[[str], str]) -> CallError:
    """The error of ClassifyBatch in the names of the compatible request."""
    if exc.field is None:
        return exc
    field = rename(exc.field)
    message = exc.message
    if message.startswith(exc.field):
        message = field + message[len(exc.field) :]
    return CallError(exc.code, message, field, exc.http_status)


@dataclass(frozen=True)
class CompatRequest:
    """A compatible request, read and checked where its body is decoded: its ClassifyBatch items
    (the policy still to set, from `model`) and how ClassifyBatch's field names read in the
    request's own terms."""

    model: str | None
    requests: list[pb.ClassifyRequest]
    rename: Callable[[str], str]


Reader = Callable[[Any, Limits], CompatRequest]
"""Reads a route's decoded JSON body (off the event loop), within the count limits."""
Answer = Callable[[Call, CompatRequest, str], Awaitable[dict[str, Any]]]
"""Answers a read request: (in-process call, request, request id) -> the JSON answer (the
answer functions below take the served names too, bound when the route is registered)."""
NamedAnswer = Callable[..., Awaitable[dict[str, Any]]]
"""An answer function before its `names` (ServedNames) keyword is bound."""


async def _classify(
    call: Call, request: CompatRequest, names: ServedNames, route_policy: str
) -> tuple[pb.GetModelInfoResponse, pb.PolicyInfo, list[pb.ClassifyResponse]]:
    info = await call("GetModelInfo", pb.GetModelInfoRequest())
    policy = select_policy(request.model, info, names, route_policy)
    for item in request.requests:
        item.policy = policy.name
    try:
        batch = pb.ClassifyBatchRequest(requests=request.requests)
        response = await call("ClassifyBatch", batch)
    except CallError as exc:
        raise _renamed(exc, request.rename) from exc
    return info, policy, list(response.results)


_ITEM = re.compile(r"requests\[(\d+)\](?:\.(.*))?$")


def _texts(value: Any, limits: Limits) -> tuple[list[str], bool]:
    """OpenAI's `input`: the texts, and whether it was a list."""
    if isinstance(value, str):
        return [value], False
    if not isinstance(value, list):
        raise _bad("input", "must be a string or an array of strings")
    _check(too_many("input", len(value), limits, "max_items"))
    texts = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict) and item.get("type") == "text":
            text = item.get("text")
            if not isinstance(text, str):
                raise _bad(f"input[{i}].text", "must be a string")
            texts.append(text)
        else:
            raise _bad(
                f"input[{i}]", "must be a string or a text object (images are not moderated)"
            )
    return texts, True


def read_openai(body: Any, limits: Limits) -> CompatRequest:
    """OpenAI's moderation request (`POST /v1/moderations`), checked."""
    body = _object(body, {"model", "input"})
    texts, listed = _texts(body["input"], limits)

    def rename(field: str) -> str:
        match = _ITEM.match(field)
        if match is None:
            return "input"
        if match.group(2) == "policy":
            return "model"
        return f"input[{match.group(1)}]" if listed else "input"

    return CompatRequest(body.get("model"), [pb.ClassifyRequest(text=t) for t in texts], rename)


async def openai_moderations(
    call: Call, request: CompatRequest, request_id: str, names: ServedNames
) -> dict[str, Any]:
    info, policy, results = await _classify(call, request, names, OPENAI_POLICY)
    answers = []
    for r in results:
        answer = result_fields(r, policy)
        answer["category_applied_input_types"] = {c: ["text"] for c in answer["categories"]}
        answers.append(answer)
    return {"id": f"modr-{request_id}", "model": names.primary(info.model),
            "policy": policy.name, "results": answers}  # fmt: skip


def message_content(value: Any, where: str) -> str:
    """A Mistral message's content: a string, or text chunks joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for i, chunk in enumerate(value):
            if not (isinstance(chunk, dict) and chunk.get("type") == "text"):
                raise _bad(f"{where}[{i}]", "only text chunks are moderated")
            text = chunk.get("text")
            if not isinstance(text, str):
                raise _bad(f"{where}[{i}].text", "must be a string")
            parts.append(text)
        return "".join(parts)
    raise _bad(where, "must be a string or an array of text chunks")


def _conversation(value: Any, where: str, limits: Limits) -> list[pb.ChatMessage]:
    """A Mistral conversation read as the core's chat messages (the turn order is checked with
    every other conversation's, by the planner), sent on as ClassifyRequest.messages."""
    if not isinstance(value, list) or not value:
        raise _bad(where, "must be a non-empty array of messages")
    _check(too_many(where, len(value), limits, "max_messages"))
    try:
        messages = chat_messages(value, where, content=message_content)
    except InvalidArgument as exc:
        raise _bad(exc.field, exc.message) from None
    return convert.chat_messages_pb(messages)


def read_mistral(body: Any, limits: Limits) -> CompatRequest:
    """Mistral's chat moderation request (`POST /v1/chat/moderations`), checked."""
    # truncate_for_context_length is Mistral's switch for what this server always does: earlier
    # turns that do not fit are dropped, oldest first (ClassifyResponse.context_messages_dropped).
    body = _object(body, {"model", "input", "truncate_for_context_length"})
    value = body["input"]
    if not isinstance(value, list) or not value:
        raise _bad("input", "must be a conversation (an array of messages) or an array of them")
    listed = isinstance(value[0], list)
    if listed:
        _check(too_many("input", len(value), limits, "max_items"))
        conversations = [_conversation(c, f"input[{i}]", limits) for i, c in enumerate(value)]
    else:
        conversations = [_conversation(value, "input", limits)]

    def rename(field: str) -> str:
        match = _ITEM.match(field)
        if match is None:
            return "input"
        item, rest = match.group(1), match.group(2)
        if rest == "policy":
            return "model"
        base = f"input[{item}]" if listed else "input"
        if rest and rest.startswith("messages"):
            return base + rest.removeprefix("messages")
        return base

    requests = [pb.ClassifyRequest(messages=m) for m in conversations]
    return CompatRequest(body.get("model"), requests, rename)


async def mistral_chat_moderations(
    call: Call, request: CompatRequest, request_id: str, names: ServedNames
) -> dict[str, Any]:
    info, policy, results = await _classify(call, request, names, MISTRAL_POLICY)
    return {"id": request_id, "model": names.primary(info.model), "policy": policy.name,
            "results": [result_fields(r, policy) for r in results]}  # fmt: skip


OPENAI_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
                403: "invalid_request_error", 404: "invalid_request_error",
                413: "invalid_request_error", 429: "rate_limit_error"}  # fmt: skip
OPENAI_CODES = {401: "invalid_api_key", 404: "model_not_found", 429: "rate_limit_exceeded"}


def openai_error(exc: CallError) -> dict[str, Any]:
    """OpenAI's error shape (the SDKs raise by HTTP status and read these keys), plus the gRPC
    status name under `status`; `param` is the offending field."""
    status = exc.status
    code = OPENAI_CODES.get(status) if status != 404 or exc.field == "model" else None
    return {
        "error": {
            "message": exc.message,
            "type": OPENAI_TYPES.get(
                status, "server_error" if status >= 500 else "invalid_request_error"
            ),
            "param": exc.field,
            "code": code or exc.code.name.lower(),
            "status": exc.code.name,
        }
    }
