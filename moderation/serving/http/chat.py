"""OpenAI's chat completions on guarded generation: the request read into a GenerateRequest, the
answer written as a `chat.completion` or as `chat.completion.chunk`s. No I/O here; the route
(`chat_route`) calls the servicer and writes the answer.

Request: OpenAI's fields `model` (a served name), `messages` (system/developer, user and
assistant turns; content a string or text parts), `stream`, `stream_options.include_usage`,
`max_completion_tokens` / `max_tokens`, `temperature` (omitted = greedy, not OpenAI's 1),
`top_p`, `seed` (Mistral's `random_seed` too), `stop` (a string or up to 4), `n` (1 only).
OpenAI's moderated completions, `moderation: {"model", "policy": {"input": {"mode"}, "output":
{"mode"}}}`: `model` picks the policy as on /v1/moderations (`omni-moderation-latest`: the
`openai` policy), mode `block` refuses a flagged input or stops a flagged answer (GenerateRequest's
moderate_input / moderate_output), mode `score` (also what a side without a policy gets) only
reports. Extra body fields of this server (the SDKs' `extra_body`): `safe_prompt` (Mistral's name
for the guardrail system prompt; on by default here), `moderate_input`, `moderate_output` (block),
`stream_check_tokens`, `policy` and `threshold`, as in GenerateRequest. OpenAI fields this
server has no use for are accepted at their neutral value (`tools: []`, `logprobs: false`,
`presence_penalty: 0`...) and refused otherwise, naming the field; unknown fields are refused.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from moderation.serving.http.compat import message_content, result_fields
from moderation.serving.http.status import CallError
from moderation.v1 import moderation_pb2 as pb

MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
FINISH = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_INPUT_FLAGGED: "content_filter",
    pb.FINISH_REASON_OUTPUT_FLAGGED: "content_filter",
}
# Fields this server takes whatever their value: they say something about the caller, not
# about the answer.
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls",
            "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options",
            "safety_identifier", "prompt_mode"}  # fmt: skip
# OpenAI and Mistral features this server does not have: accepted only when they ask for
# nothing (null, false, 0, empty, "none"), so that a client sending its defaults works.
_NEUTRAL_ONLY = {"tools", "tool_choice", "functions", "function_call", "logit_bias", "logprobs",
                 "top_logprobs", "presence_penalty", "frequency_penalty", "response_format",
                 "modalities", "audio", "prediction", "reasoning_effort", "web_search_options",
                 "verbosity", "suffix"}  # fmt: skip
_FIELDS = {"model", "messages", "stream", "stream_options", "max_tokens",
           "max_completion_tokens", "temperature", "top_p", "seed", "random_seed", "stop", "n",
           "safe_prompt", "moderate_input", "moderate_output", "stream_check_tokens", "policy",
           "threshold", "moderation"}  # fmt: skip
_MESSAGE_FIELDS = {"role", "content", "name"}


def bad(field: str, message: str) -> CallError:
    return CallError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}", field)


def _neutral(value: Any) -> bool:
    if isinstance(value, dict) and value.get("type") == "text" and len(value) == 1:
        return True  # response_format {"type": "text"}
    return value in (None, False, 0, "", [], {}, "none")


@dataclass(frozen=True)
class ChatRequest:
    """A chat completion request, read: the generation to run and how to answer."""

    model: str
    generation: pb.GenerateRequest
    stream: bool
    include_usage: bool
    stop: tuple[str, ...]
    # Which request field a GenerateRequest field came from, for error messages.
    names: dict[str, str]
    # OpenAI's `moderation.model` (it picks the policy), and the sides only scored, not blocked.
    moderation_model: str | None = None
    score_input: bool = False
    score_output: bool = False

    @property
    def moderated(self) -> bool:
        """Whether the answer reports moderation (OpenAI's `moderation` field)."""
        g = self.generation
        return g.moderate_input or g.moderate_output or self.score_input or self.score_output


def _typed(body: dict[str, Any], key: str, kinds: type | tuple[type, ...], what: str) -> Any:
    value = body.get(key)
    if value is None:
        return None
    # bool is an int in Python; a JSON true is not a number here.
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise bad(key, f"must be {what}")
    if not isinstance(value, kinds):
        raise bad(key, f"must be {what}")
    return value


def _messages(value: Any) -> list[pb.ChatMessage]:
    if not isinstance(value, list) or not value:
        raise bad("messages", "must be a non-empty array of messages")
    messages = []
    for i, message in enumerate(value):
        at = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(at, "must be a message object")
        for key, item in message.items():
            if key not in _MESSAGE_FIELDS and not _neutral(item):
                raise bad(f"{at}.{key[:100]}", "is not supported (text messages only)")
        role = message.get("role")
        if role not in ROLES:
            raise bad(f"{at}.role", "must be one of system, developer, user, assistant")
        content = message_content(message.get("content"), f"{at}.content")
        messages.append(pb.ChatMessage(role=ROLES[role], content=content))
    return messages


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop", "must be a non-empty string or an array of them")
    if len(stops) > MAX_STOPS:
        raise bad("stop", f"at most {MAX_STOPS} stop sequences, got {len(stops)}")
    for i, stop in enumerate(stops):
        if len(stop) > MAX_STOP_CHARS:
            raise bad(f"stop[{i}]", f"longer than {MAX_STOP_CHARS} characters")
    return tuple(stops)


def _moderation(value: Any) -> tuple[str, str, str]:
    """OpenAI's `moderation` parameter: (model, input mode, output mode)."""
    if not isinstance(value, dict):
        raise bad("moderation", "must be an object")
    for key in value:
        if key not in ("model", "policy"):
            raise bad(f"moderation.{key}"[:120], "unknown field")
    model = value.get("model")
    if not isinstance(model, str) or not model:
        raise bad("moderation.model", "is required: a moderation model name or a policy")
    policy = value.get("policy") or {}
    if not isinstance(policy, dict):
        raise bad("moderation.policy", "must be an object")
    modes = {"input": "score", "output": "score"}
    for key, side in policy.items():
        where = f"moderation.policy.{key}"[:120]
        if key not in modes:
            raise bad(where, "unknown field")
        if side is None:
            continue
        mode = side.get("mode") if isinstance(side, dict) else None
        if mode not in ("score", "block") or len(side) != 1:
            raise bad(where, 'must be {"mode": "score"} or {"mode": "block"}')
        modes[key] = mode
    return model, modes["input"], modes["output"]


def read_request(body: Any) -> ChatRequest:
    """The request body read and checked; CallError(INVALID_ARGUMENT, field) when it is not
    one. What GenerateRequest checks (limits, roles' order, ranges) the servicer checks."""
    if not isinstance(body, dict):
        raise CallError(grpc.StatusCode.INVALID_ARGUMENT, "the request body must be a JSON object")
    for key, value in body.items():
        if key in _FIELDS or key in _IGNORED:
            continue
        if key in _NEUTRAL_ONLY:
            if not _neutral(value):
                raise bad(key, "is not supported by this server")
            continue
        raise bad(key[:100], "unknown field")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "is required: one of the names GET /v1/models lists")
    if "messages" not in body:
        raise bad("messages", "is required")
    messages = _messages(body["messages"])
    n = _typed(body, "n", int, "an integer")
    if n not in (None, 1):
        raise bad("n", "only 1 choice per request is supported")
    stream = bool(_typed(body, "stream", bool, "true or false"))
    options = _typed(body, "stream_options", dict, "an object") or {}
    if options and not stream:
        raise bad("stream_options", "is only allowed with stream: true")
    for key in options:
        if key not in ("include_usage", "include_obfuscation", "continuous_usage_stats"):
            raise bad(f"stream_options.{key}", "unknown field")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad("stream_options.include_usage", "must be true or false")

    names = {"messages": "messages"}
    request = pb.GenerateRequest(messages=messages)
    limit_key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _typed(body, limit_key, int, "an integer")
    if max_tokens is not None:
        if max_tokens < 1:
            raise bad(limit_key, f"must be at least 1, got {max_tokens}")
        request.max_new_tokens = min(max_tokens, 2**32 - 1)
    names["max_new_tokens"] = limit_key
    for key in ("temperature", "top_p"):
        value = _typed(body, key, (int, float), "a number")
        if value is not None:
            setattr(request, key, float(value))
        names[key] = key
    seed_key = "seed" if "seed" in body else "random_seed"
    seed = _typed(body, seed_key, int, "an integer")
    if seed is not None:
        if not 0 <= seed < 2**64:
            raise bad(seed_key, "must be between 0 and 2^64 - 1")
        request.seed = seed
    names["seed"] = seed_key
    safe_prompt = _typed(body, "safe_prompt", bool, "true or false")
    request.disable_guardrail = safe_prompt is False
    for key in ("moderate_input", "moderate_output"):
        setattr(request, key, bool(_typed(body, key, bool, "true or false")))
    check = _typed(body, "stream_check_tokens", int, "an integer")
    if check is not None:
        if not 0 <= check < 2**32:
            raise bad("stream_check_tokens", f"must be a non-negative integer, got {check}")
        request.stream_check_tokens = check
    policy = _typed(body, "policy", str, "a string")
    if policy is not None:
        request.policy = policy
    threshold = _typed(body, "threshold", (int, float), "a number")
    if threshold is not None:
        request.threshold = float(threshold)
    for key in ("stream_check_tokens", "policy", "threshold"):
        names[key] = key
    chat = ChatRequest(model, request, stream, include_usage, _stops(body.get("stop")), names)
    if body.get("moderation") is None:
        return chat
    if policy is not None:
        raise bad("policy", "give either it or moderation.model, which picks the policy")
    moderation_model, input_mode, output_mode = _moderation(body["moderation"])
    request.moderate_input |= input_mode == "block"
    request.moderate_output |= output_mode == "block"
    return dataclasses.replace(
        chat,
        moderation_model=moderation_model,
        score_input=not request.moderate_input,
        score_output=not request.moderate_output,
    )


def rename(field: str, names: dict[str, str]) -> str:
    """A GenerateRequest field path (`max_new_tokens`, `messages[1].role`) in the request's
    names."""
    head = field.split("[", 1)[0].split(".", 1)[0]
    return names.get(head, head) + field[len(head) :]


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first stop sequence (which is not included), and whether one was found."""
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(ends)], True) if ends else (text, False)


class StopScanner:
    """Streamed text with the stop sequences cut off: text is let through as soon as no stop
    sequence can begin in it; a suffix that could begin one waits for the next delta."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.held = ""
        self.stopped = False

    def push(self, delta: str) -> str:
        if self.stopped:
            return ""
        text, found = cut_at_stop(self.held + delta, self.stops)
        if found:
            self.stopped, self.held = True, ""
            return text
        keep = max((_overlap(text, s) for s in self.stops), default=0)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The held text, at the end of the answer (it began no stop sequence after all)."""
        held, self.held = self.held, ""
        return "" if self.stopped else held


def _overlap(text: str, stop: str) -> int:
    """The length of the longest end of `text` that begins `stop`."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-size:]):
            return size
    return 0


def moderation_results(
    result: pb.ClassifyResponse, policy: pb.PolicyInfo, model: str
) -> dict[str, Any]:
    """One side's moderation in OpenAI's shape (`moderation.input` / `.output`): the result as
    /v1/moderations gives it, in the policy that classified it (`policy`, an extra field)."""
    fields = result_fields(result, policy)
    fields["category_applied_input_types"] = {c: ["text"] for c in fields["categories"]}
    fields.update(model=model, type="moderation_result")
    return {"type": "moderation_results", "model": model, "policy": policy.name,
            "results": [fields]}  # fmt: skip


def usage(response: pb.GenerateResponse) -> dict[str, int]:
    return {
        "prompt_tokens": response.prompt_tokens,
        "completion_tokens": response.completion_tokens,
        "total_tokens": response.prompt_tokens + response.completion_tokens,
    }


def finish_reason(response: pb.GenerateResponse, stopped: bool) -> str:
    if response.refused:
        return "content_filter"
    return "stop" if stopped else FINISH.get(response.finish_reason, "stop")


@dataclass(frozen=True)
class Answer:
    """What every object of one answer shares."""

    id: str
    model: str
    created: int

    @classmethod
    def new(cls, request_id: str, model: str) -> Answer:
        return cls(f"chatcmpl-{request_id}", model, int(time.time()))

    def completion(
        self,
        response: pb.GenerateResponse,
        stops: Sequence[str],
        moderation: dict[str, Any] | None,
    ) -> dict[str, Any]:
        text, stopped = cut_at_stop(response.text, stops)
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if response.refused:
            message.update(content=None, refusal=response.refusal)
        answer = {
            "id": self.id, "object": "chat.completion", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": finish_reason(response, stopped)}],
            "usage": usage(response),
        }  # fmt: skip
        if moderation is not None:
            answer["moderation"] = moderation
        return answer

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }  # fmt: skip

    def last_chunk(
        self, response: pb.GenerateResponse, stopped: bool, moderation: dict[str, Any] | None
    ) -> dict[str, Any]:
        """The chunk with the finish reason, and moderation's results beside it."""
        delta = {"refusal": response.refusal} if response.refused else {}
        chunk = self.chunk(delta, finish_reason(response, stopped))
        if moderation is not None:
            chunk["moderation"] = moderation
        return chunk

    def usage_chunk(self, response: pb.GenerateResponse) -> dict[str, Any]:
        """stream_options.include_usage: a last chunk without choices, as OpenAI sends it."""
        chunk = self.chunk({})
        chunk.update(choices=[], usage=usage(response))
        return chunk
