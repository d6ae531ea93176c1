"""A large gRPC request's counts, read on its protobuf bytes before it is parsed.

grpc.aio parses each request on the event loop, and protobuf's parser holds the GIL for the
whole message: a ClassifyBatch of 1.3 M empty items (2.6 MB) held it 156 ms, then 27 ms more to
free it, and 64 such callers stalled every answer, health included. So a body over
`interceptors.DEFER_BYTES` reaches the servicer unparsed; there, on a planning thread, `check`
walks its fields (Python: the GIL changes hands between fields), stopping at the first counted
field past its limit or the first message with more fields than any valid one, and only then
does protobuf parse it, its cost now bounded by the limits.
"""

from __future__ import annotations

from typing import Any

from moderation.core.errors import InvalidArgument
from moderation.serving.request_limits import COUNTED, Limits

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


class _Malformed(Exception):
    """Not protobuf: left to the parser to report."""


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _Malformed
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _counts_inside(descriptor: Any) -> bool:
    """Whether a message type holds a counted field, at any depth (requests -> messages)."""
    return any(
        fd.message_type is not None and (fd.name in COUNTED or _counts_inside(fd.message_type))
        for fd in descriptor.fields
        if fd.message_type is not descriptor
    )


def check(data: bytes, descriptor: Any, limits: Limits, *, batch: bool) -> None:
    """InvalidArgument naming the field when the message's counts are past the limits; bytes
    that are not protobuf pass (the parser says so)."""
    try:
        _check(memoryview(data), descriptor, limits, "", limits.values(batch=batch))
    except _Malformed:
        return


def _check(data: memoryview, descriptor: Any, limits: Limits, path: str, budget: int) -> None:
    counts: dict[int, int] = {}
    fields = 0
    pos = 0
    while pos < len(data):
        tag, pos = _varint(data, pos)
        number, wire = tag >> 3, tag & 7
        fields += 1
        if fields > budget:
            raise InvalidArgument(
                path or "request",
                f"more than {budget} fields, more than any valid request within "
                "MODERATION_MAX_BATCH_ITEMS and MODERATION_MAX_MESSAGES",
            )
        if wire == _VARINT:
            _, pos = _varint(data, pos)
        elif wire == _FIXED64:
            pos += 8
        elif wire == _FIXED32:
            pos += 4
        elif wire == _LENGTH:
            length, pos = _varint(data, pos)
            end = pos + length
            if end > len(data):
                raise _Malformed
            fd = descriptor.fields_by_number.get(number)
            if fd is not None and fd.message_type is not None:
                where = f"{path}.{fd.name}" if path else fd.name
                count = counts[number] = counts.get(number, 0) + 1
                kind = COUNTED.get(fd.name)
                message = limits.over(where, count, kind) if kind is not None else None
                if message is not None:
                    raise InvalidArgument(where, message.replace(str(count), f"{count}+", 1))
                if kind == "max_items" and _counts_inside(fd.message_type):
                    item = f"{where}[{count - 1}]"
                    _check(data[pos:end], fd.message_type, limits, item, limits.item_values)
            pos = end
        else:  # groups and invalid wire types: not this service's messages
            raise _Malformed
