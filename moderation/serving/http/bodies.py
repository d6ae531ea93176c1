"""An HTTP request's JSON body, decoded within limits (a large one on the planning threads).

Why this is not one `json.loads` on the event loop: decoding a 4 MB body of 1.3 M empty items
took 0.7 s holding the GIL, and the walk and `json_format.ParseDict` after it seconds more, all
before any count limit; every other caller, health probes included, waited. So the listener:

1. measures the body's shape before decoding it (`shape`): nesting depth and how many JSON
   values it holds, counted on the bytes with numpy in 256 KiB chunks (C loops that release
   the GIL, stopping at the first chunk over a limit), and refuses a body deeper than
   MAX_DEPTH or with more values than its route can use (`Limits.values`);
2. decodes it (`decode`) with a Python hook per object, so that the decoding thread hands the
   GIL back to the event loop between objects instead of holding it for the whole body;
3. checks the counts (batch items, messages) before anything walks the items (`check_counts`).

All of it runs under the request's deadline, on the planning threads (`--plan-threads`) when
the body is larger than the planning rule's 2 KiB (`serving.planning_threads`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import grpc
import numpy as np

from moderation.serving.http.status import CallError
from moderation.serving.request_limits import COUNTED, Limits

__all__ = ["MAX_DEPTH", "Limits", "check_counts", "decode", "shape", "too_many"]

MAX_DEPTH = 32
"""Deepest nesting of arrays and objects accepted: the deepest valid body (a Mistral batch of
conversations of messages of text chunks) nests 5 levels; Python's decoder fails at ~1,000."""
CHUNK = 256 * 1024

_QUOTE, _BACKSLASH, _COMMA = 0x22, 0x5C, 0x2C
_OPENERS, _CLOSERS = (0x5B, 0x7B), (0x5D, 0x7D)


def _bad_body(message: str, http_status: int | None = None) -> CallError:
    return CallError(grpc.StatusCode.INVALID_ARGUMENT, message, http_status=http_status)


def shape(data: bytes, *, max_depth: int = MAX_DEPTH, max_values: int) -> tuple[int, int]:
    """(deepest nesting, JSON values) of a body, counted on its bytes outside strings; stops
    with a CallError at the first chunk past `max_depth` or `max_values`. Values are counted as
    containers + commas + 1, an upper bound of the values a decoder would build."""
    parity = 0  # inside a string at the chunk's start
    run = 0  # backslashes ending the previous chunk
    depth = deepest = 0
    values = 1
    for start in range(0, len(data), CHUNK):
        a = np.frombuffer(data, np.uint8, count=min(CHUNK, len(data) - start), offset=start)
        quotes = a == _QUOTE
        backslashes = a == _BACKSLASH
        if run or backslashes.any():
            # A quote after an odd run of backslashes is escaped: part of the string.
            index = np.arange(a.size, dtype=np.int32)
            last_other = np.maximum.accumulate(np.where(backslashes, -1, index))
            before = np.empty(a.size, np.int32)
            before[0] = run
            before[1:] = index[:-1] - last_other[:-1] + np.where(last_other[:-1] < 0, run, 0)
            quotes &= before % 2 == 0
            run = int(a.size - 1 - last_other[-1]) + (run if last_other[-1] < 0 else 0)
        inside = (np.cumsum(quotes, dtype=np.int32) + parity) & 1
        parity = int(inside[-1])
        outside = inside == 0
        opens = ((a == _OPENERS[0]) | (a == _OPENERS[1])) & outside
        closes = ((a == _CLOSERS[0]) | (a == _CLOSERS[1])) & outside
        levels = np.cumsum(opens.astype(np.int32) - closes, dtype=np.int32) + depth
        deepest = max(deepest, int(levels.max()))
        depth = int(levels[-1])
        values += int(np.count_nonzero(opens)) + int(np.count_nonzero((a == _COMMA) & outside))
        if deepest > max_depth:
            raise _bad_body(f"the request body nests deeper than {max_depth} levels")
        if values > max_values:
            raise _bad_body(
                f"the request body holds more than {max_values} JSON values, more than any valid "
                "request within MODERATION_MAX_BATCH_ITEMS and MODERATION_MAX_MESSAGES",
                http_status=413,
            )
    return deepest, values


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A Python hook rather than dict itself: running bytecode between objects is what lets the
    # decoding thread give the GIL back to the event loop.
    return dict(pairs)


def decode(data: bytes, limits: Limits, *, batch: bool) -> Any:
    """The body's JSON value, or CallError: not JSON (4xx), too deep, too many values (413)."""
    if not data:
        return {}
    shape(data, max_values=limits.values(batch=batch))
    try:
        return json.loads(data, object_pairs_hook=_object)
    except RecursionError:  # shape() bounds the depth; kept as the last line of defence
        raise _bad_body(f"the request body nests deeper than {MAX_DEPTH} levels") from None
    except UnicodeDecodeError as exc:
        raise _bad_body(f"the request body is not UTF-8 JSON ({exc.reason})") from None
    except ValueError as exc:  # JSONDecodeError, and integers past Python's 4,300 digits
        reason = str(exc).split(":")[0]  # no echo of the caller's value
        raise _bad_body(f"the request body is not JSON: {reason}") from None


def too_many(field: str, count: int, limits: Limits, kind: str) -> CallError | None:
    """The error of `count` entries in `field` past its limit (`kind`: max_items, max_messages)."""
    message = limits.over(field, count, kind)
    if message is None:
        return None
    return CallError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}", field)


def check_counts(value: Any, descriptor: Any, limits: Limits, path: str = "") -> None:
    """The count limits of a transcoded request's JSON (proto3 JSON names or field names),
    before the unknown-field walk and ParseDict run over every item."""
    if not isinstance(value, Mapping):
        return
    for key, item in value.items():
        fd = descriptor.fields_by_name.get(key) or descriptor.fields_by_camelcase_name.get(key)
        if fd is None or fd.message_type is None:
            continue
        where = f"{path}.{fd.name}" if path else fd.name
        if isinstance(item, Mapping) and not fd.is_repeated:  # ModerateStream's `open`
            check_counts(item, fd.message_type, limits, where)
            continue
        if not isinstance(item, list):
            continue
        kind = COUNTED.get(fd.name)
        if kind is not None:
            error = too_many(where, len(item), limits, kind)
            if error is not None:
                raise error
        for i, element in enumerate(item):
            check_counts(element, fd.message_type, limits, f"{where}[{i}]")
