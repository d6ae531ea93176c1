"""The JSON form of every ModerationService method, read from its google.api.http annotation.

Routes are not written by hand: each method of the service descriptor carries an HttpRule
(`option (google.api.http)` in the proto), and this module turns each rule into a route, the
same rules Envoy's gRPC-JSON transcoder and grpc-gateway read, so a caller gets the same HTTP
API from this listener as from either of them in front of the gRPC port.

Bodies follow the proto3 JSON mapping (google.protobuf.json_format): requests accept the
lowerCamelCase and the proto field names, unknown fields are refused (INVALID_ARGUMENT naming
the field); responses use lowerCamelCase names and print fields left at their default
(`"flagged": false` rather than nothing), as grpc-gateway does by default.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.api import annotations_pb2, http_pb2
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from moderation.serving.http.status import CallError, caller_field

Descriptor = Any  # protobuf's Python and upb descriptor classes, which mypy tells apart

VERBS = ("get", "put", "post", "delete", "patch")


@dataclass(frozen=True)
class Route:
    """One HTTP binding of one RPC."""

    verb: str  # upper case: GET, POST...
    path: str
    rpc: str  # the method's name, e.g. "Classify"
    body: str  # the rule's body: "*" (the whole request), "" (none) or a field name
    request_type: type[Message]
    response_type: type[Message]
    server_streaming: bool


def _bindings(rule: http_pb2.HttpRule) -> list[http_pb2.HttpRule]:
    return [rule, *rule.additional_bindings]


def routes(service: ServiceDescriptor) -> list[Route]:
    """The routes of every annotated method of `service`.

    Path templates with variables (`/v1/{name=policies/*}`) are refused at start-up rather than
    served wrongly: this service's rules have none.
    """
    found = []
    for method in service.methods:
        options = method.GetOptions()
        if not options.HasExtension(annotations_pb2.http):
            continue
        for rule in _bindings(options.Extensions[annotations_pb2.http]):
            kind = rule.WhichOneof("pattern")
            if kind not in VERBS:
                raise ValueError(f"{method.full_name}: unsupported HttpRule pattern {kind!r}")
            path = getattr(rule, kind)
            if "{" in path:
                raise ValueError(f"{method.full_name}: path variables are not supported ({path})")
            found.append(
                Route(
                    verb=kind.upper(),
                    path=path,
                    rpc=method.name,
                    body=rule.body,
                    request_type=GetMessageClass(method.input_type),
                    response_type=GetMessageClass(method.output_type),
                    server_streaming=method.server_streaming,
                )
            )
    return found


def to_json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def _field(descriptor: Descriptor, key: str) -> FieldDescriptor | None:
    return descriptor.fields_by_name.get(key) or descriptor.fields_by_camelcase_name.get(key)


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.message_type is not None and fd.message_type.GetOptions().map_entry


def _unknown_field(value: Any, descriptor: Descriptor, path: str) -> CallError | None:
    """The first key of `value` that `descriptor` does not have, as an INVALID_ARGUMENT naming
    it by its path (proto field names, indexes in brackets): json_format's own message names the
    message type rather than the field, and only the first level."""
    if not isinstance(value, dict):
        return None  # json_format reports the wrong type with the field's path
    for key, item in value.items():
        fd = _field(descriptor, key)
        where = f"{path}.{caller_field(key)}" if path else caller_field(key)
        if fd is None:
            return CallError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: unknown field", where)
        where = f"{path}.{fd.name}" if path else fd.name
        if fd.message_type is None or _is_map(fd) or item is None:
            continue
        items = item if fd.is_repeated else [item]
        if not isinstance(items, list):
            continue
        for i, element in enumerate(items):
            inner = f"{where}[{i}]" if fd.is_repeated else where
            error = _unknown_field(element, fd.message_type, inner)
            if error is not None:
                return error
    return None


_AT = re.compile(r" at \"?([A-Za-z_][\w.\[\]]*?)\"?\.?$")
_SEGMENT = re.compile(r"([A-Za-z_]\w*)((?:\[[^\]]*\])*)")


def _proto_path(json_path: str, descriptor: Descriptor) -> str | None:
    """`ClassifyBatchRequest.requests[0].categoryThresholds[x]` -> `requests[0].
    category_thresholds[x]`: json_format's path of an error, in the API's field names."""
    parts = json_path.split(".")[1:]  # the first part is the message type
    names = []
    current: Descriptor | None = descriptor
    for part in parts:
        match = _SEGMENT.fullmatch(part)
        if match is None or current is None:
            return None
        fd = _field(current, match.group(1))
        if fd is None:
            return None
        names.append(fd.name + match.group(2))
        current = None if _is_map(fd) else fd.message_type
    return ".".join(names) or None


def parse(data: Any, message_type: type[Message]) -> Message:
    """A request from its JSON form; CallError(INVALID_ARGUMENT, field) when it is not one."""
    message = message_type()
    if not isinstance(data, dict):
        raise CallError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request body must be a JSON object, got {type(data).__name__}",
        )
    error = _unknown_field(data, message.DESCRIPTOR, "")
    if error is not None:
        raise error
    try:
        json_format.ParseDict(data, message, ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        text = str(exc).split("\n")[0]
        match = _AT.search(text)
        field = _proto_path(match.group(1), message.DESCRIPTOR) if match else None
        if field is None:  # "Failed to parse <field> field: ..." at the top level
            head = re.match(r"Failed to parse (\w+) field", text)
            fd = _field(message.DESCRIPTOR, head.group(1)) if head else None
            field = fd.name if fd is not None else None
        if match is not None:
            text = text[: match.start()]
        text = re.sub(r"^(Failed to parse \w+ field: )+", "", text)
        message_text = f"{field}: {text}" if field else text
        raise CallError(grpc.StatusCode.INVALID_ARGUMENT, message_text, field) from exc
    except (ValueError, TypeError, OverflowError) as exc:  # what json_format does not wrap
        raise CallError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request body is not a {message.DESCRIPTOR.name} ({type(exc).__name__})",
        ) from exc
    return message


def parse_query(query: Mapping[str, str], message_type: type[Message]) -> Message:
    """A request of a GET route from its query parameters (top-level scalar fields only)."""
    return parse(dict(query), message_type)
