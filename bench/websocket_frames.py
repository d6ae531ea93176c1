"""What a WebSocket message of /v1/moderate/stream costs the event loop, by shape and size.

Two parts run on the loop whatever the route does: aiohttp's frame reader (unmasking, joining
fragments, inflating a compressed message, decoding its UTF-8), bounded by the message size
limit (--max-message-bytes), and the route's own parsing of messages up to
`planning_threads.INLINE_BYTES` (larger ones go to the planning threads). This measures
the longest single step of each: the reader's last `feed_data` call (the one that completes a
message, fed in 64 KiB reads as the transport delivers them) and `moderate_stream.parse_message`
on the worst shapes the limits let through. No server, no model: one process, no network.

    python bench/websocket_frames.py [--repeat 20] [--max-bytes 4194304] [--sizes 4096 16384]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader

from moderation.core.errors import InvalidArgument
from moderation.serving import planning_threads
from moderation.serving.http import moderate_stream
from moderation.serving.http.bodies import Limits
from tests.websocket_wire import TEXT, frame

READ = 64 * 1024  # what one transport read hands the reader


def client_frame(payload: bytes, *, compressed: bool) -> bytes:
    """One masked text frame, its payload deflated (RSV1 set) when `compressed`."""
    if not compressed:
        return frame(TEXT, payload)
    deflate = zlib.compressobj(wbits=-15)
    data = (deflate.compress(payload) + deflate.flush(zlib.Z_SYNC_FLUSH))[:-4]
    return frame(TEXT, data, rsv=4)


class _Protocol:
    _reading_paused = False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def reader_last_step_ms(data: bytes, max_bytes: int, *, compressed: bool) -> float:
    """Milliseconds of the reader's `feed_data` call that completes the message."""
    loop = asyncio.new_event_loop()
    try:
        queue = WebSocketDataQueue(_Protocol(), 2**16, loop=loop)  # type: ignore[arg-type]
        reader = WebSocketReader(queue, max_bytes, compress=compressed, decode_text=True)
        wire = client_frame(data, compressed=compressed)
        for start in range(0, len(wire) - READ, READ):
            reader.feed_data(wire[start : start + READ])
        last = wire[(max(len(wire) - 1, 0) // READ) * READ :]
        begin = time.perf_counter()
        reader.feed_data(last)
        elapsed = time.perf_counter() - begin
        assert queue.exception() is None, queue.exception()
        return 1000 * elapsed
    finally:
        loop.close()


def parse_ms(text: str) -> float:
    begin = time.perf_counter()
    with contextlib.suppress(InvalidArgument):  # refusing is part of what is timed
        moderate_stream.parse_message(text, LIMITS)
    return 1000 * (time.perf_counter() - begin)


LIMITS = Limits(max_items=256, max_messages=256)  # the defaults


def inline_shapes(size: int) -> dict[str, str]:
    """The costliest messages of at most `size` bytes that reach parsing: the most JSON values
    (each walked by json_format), as messages (counted: 256 at most) or as threshold keys."""
    message = '{"role":"user","content":"a"}'
    messages = min(256, (size - 30) // (len(message) + 1))
    keys = (size - 40) // 12  # "k1234":0.5,
    return {
        f"{messages} messages": '{"open":{"messages":[' + ",".join([message] * messages) + "]}}",
        f"{keys} threshold keys": json.dumps(
            {"open": {"categoryThresholds": {f"k{i}": 0.5 for i in range(keys)}}},
            separators=(",", ":"),
        ),
        "one delta of 2-4 byte characters": json.dumps(
            {"delta": "\u00e9\U0001f600" * (size // 20)}
        ),
        "one delta of ASCII": json.dumps({"delta": "a" * (size - 20)}),
        "32 levels deep": '{"open":{"messages":[' + "[" * 30 + "]" * 30 + "]}}",
        "commas (refused by shape)": "[" + "0," * (size // 2 - 2) + "0]",
    }


def timed(fn: Callable[[], float], repeat: int) -> tuple[float, float]:
    runs = [fn() for _ in range(repeat)]
    return statistics.median(runs), max(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--max-bytes", type=int, default=4 * 1024 * 1024)
    parser.add_argument("--sizes", type=int, nargs="*", default=[],
                        help="more message sizes to time parse_message at")  # fmt: skip
    ns = parser.parse_args()
    limit = ns.max_bytes
    big = limit - 1  # the largest message under the limit
    print(f"load {os.getloadavg()[0]:.2f}; median / max of {ns.repeat} runs, ms")
    print("aiohttp reader, the step completing one message:")
    words = json.dumps({"delta": "word " * (big // 5 - 5)}).encode()
    messages: dict[str, tuple[bytes, bool]] = {
        f"{big:,} B ASCII text": (b"a" * big, False),
        f"{big:,} B text, 2-4 byte characters": (("\u00e9\U0001f600" * (big // 6)).encode(), False),
        f"{big:,} B of spaces, deflated": (b" " * big, True),
        f"{big:,} B of JSON, deflated": (words, True),
    }  # fmt: skip
    for name, (data, compressed) in messages.items():
        med, worst = timed(lambda d=data, c=compressed: reader_last_step_ms(d, limit, compressed=c),
                           ns.repeat)  # fmt: skip
        print(f"  {name:45s} {med:8.2f} {worst:8.2f}")
    inline = planning_threads.INLINE_BYTES
    print(f"parse_message (on the loop up to planning_threads.INLINE_BYTES = {inline:,}):")
    for size in sorted({inline, *ns.sizes}):
        for name, text in inline_shapes(size).items():
            med, worst = timed(lambda t=text: parse_ms(t), ns.repeat)
            print(f"  {name:45s} {med:8.2f} {worst:8.2f}  ({len(text.encode()):,} B)")


if __name__ == "__main__":
    main()
