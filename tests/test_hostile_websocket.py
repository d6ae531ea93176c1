"""The hostile replay of the WebSocket route (`GET /v1/moderate/stream`, issue #19's
leftover): a seeded generator (the HTTP replay's seed; as many sessions as one HTTP route gets,
HOSTILE_HTTP_REQUESTS / 8) of hostile handshakes and of hostile frame sequences after a good
one, sent from 8 threads on plain sockets (`websocket_wire`) while health is probed on both
transports.

Asserted: no handshake answer is a 5xx; every connection the server upgraded ends with a close
frame whose code is in ALLOWED_CLOSE, within the idle timeout (no connection is left hanging);
every message it sends is bounded and no error is INTERNAL or UNKNOWN; health answers SERVING in
under 1 s throughout; afterwards no check is left open, every cache slot is free and a good
stream still gets its verdicts.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from moderation.core.errors import InvalidArgument
from moderation.serving.calls import MAX_ERROR_CHARS
from moderation.serving.http import bodies
from moderation.serving.http.bodies import Limits
from moderation.serving.http.moderate_stream import parse_message
from moderation.serving.worker.worker_thread import WorkerThread
from tests.servers import SERVING, InProcessServer, demo_server, free_port, health_status
from tests.test_hostile_inputs import HTTP_HEALTH, HTTP_REQUESTS, SEED, hostile_text, http_send
from tests.websocket_wire import (
    BINARY,
    CLOSE,
    CONTINUATION,
    PING,
    PONG,
    TEXT,
    Closing,
    Headers,
    RawWebSocket,
    close_frame,
    frame,
)

SESSIONS = max(1, HTTP_REQUESTS // 8)  # what one of the HTTP replay's 8 routes gets
TOKEN = "s3cret"
GOOD = {"Authorization": f"Bearer {TOKEN}"}
MAX_MESSAGE_BYTES = 2 * 1024 * 1024  # room for the 1 MB values below, and frames past it
IDLE = 2.0  # stream_idle_timeout: silent sessions end quickly
MB = 1_000_000
MAX_TEXT_CHARS = 16 * 1024
"""The longest answer a session may get: an error's message and field are capped at
MAX_ERROR_CHARS characters each (asserted on their own), and JSON writes each non-ASCII one
as an escape of up to 12 characters (a 512-character cap of "é" is a 3 kB answer)."""

ALLOWED_CLOSE = {
    1000,  # normal closure: the check ended (its last verdict sent)
    1002,  # protocol error: the caller broke the framing (RFC 6455 5.2, 5.4, 5.5, 7.4.1)
    1007,  # invalid frame payload data: a text frame that is not UTF-8 (RFC 6455 8.1)
    1008,  # policy violation: a message the API refuses (INVALID_ARGUMENT, idle, deadline)
    1009,  # message too big: over --max-message-bytes
    1013,  # try again later: the server is loading, draining or holds its most checks
}
"""The close codes a caller's input may get (RFC 6455 7.4.1, IANA's registry for 1013); never
1011 (internal error: the server's own fault), 1001 (going away: a shutdown) or no close frame
at all (1006: the server dropped the connection)."""


@dataclass(frozen=True)
class Session:
    """One connection of the replay: its upgrade request, then frames to send."""

    kind: str
    headers: Headers = field(default_factory=dict)
    method: str = "GET"
    upgrade: bool = True  # whether the handshake asks for a valid upgrade
    frames: tuple[bytes, ...] = ()
    hang_up: bool = False  # drop the connection after the frames instead of reading
    closes: frozenset[int] = frozenset()  # the close codes this kind may get (upgraded, read)


def text(value: object) -> bytes:
    return frame(TEXT, json.dumps(value).encode())


def raw_text(data: str | bytes) -> bytes:
    return frame(TEXT, data.encode() if isinstance(data, str) else data)


OPEN = {"open": {"threshold": 1.0, "checkTokens": 4}}
DONE = {"done": True}


def good_stream(rng: random.Random) -> list[bytes]:
    words = ["Hello there.", *(hostile_text(rng, big=200)[:300] for _ in range(rng.randint(0, 5)))]
    return [text(OPEN), *(text({"delta": w + " "}) for w in words), text(DONE)]


def codes(*allowed: int) -> frozenset[int]:
    assert set(allowed) <= ALLOWED_CLOSE
    return frozenset(allowed)


ENDED, REFUSED, RETRY = codes(1000), codes(1008), codes(1013)


def hostile_handshake(rng: random.Random) -> Session:
    kind = rng.randrange(9)
    if kind == 0:
        return Session("no upgrade", {**GOOD, "Upgrade": None, "Connection": None}, upgrade=False)
    if kind == 1:
        # (aiohttp also accepts the drafts' 7 and 8)
        version = rng.choice(["6", "12", "14", "", "abc", "13, 8", "9" * 100])
        return Session("wrong version", {**GOOD, "Sec-WebSocket-Version": version}, upgrade=False)
    if kind == 2:
        key = rng.choice(["", "short", "!" * 24, "x" * 5000])
        return Session("bad key", {**GOOD, "Sec-WebSocket-Key": key}, upgrade=False)
    if kind == 3:
        return Session("POST", GOOD, method=rng.choice(["POST", "PUT", "DELETE"]), upgrade=False)
    if kind == 4:  # latin-1 characters go out as their bytes: invalid UTF-8
        auth = rng.choice([None, "Bearer \xff\xe9", "\xff" * 300, "Bearer", f"Bearer {TOKEN}x",
                           f"bearer {TOKEN}", "Bearer " + "a" * 5000])  # fmt: skip
        return Session("bad token", {"Authorization": auth}, upgrade=False)
    if kind == 5:
        timeout = rng.choice(["x", "1" * 30 + "S", "-1S", "5 S", "\xff"])
        return Session("bad grpc-timeout", {**GOOD, "grpc-timeout": timeout}, upgrade=False)
    if kind == 6:  # the upgrade is fine: these headers are only odd
        extra = rng.choice([
            {"Sec-WebSocket-Extensions": "permessage-deflate; server_max_window_bits=99"},
            {"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"},
            {"Sec-WebSocket-Protocol": "\xff" * 100},
            {"x-request-id": "r" * 5000},
            {"Origin": "http://\xff.example"},
        ])  # fmt: skip
        return Session("odd headers", {**GOOD, **extra}, frames=tuple(good_stream(rng)),
                       closes=ENDED | RETRY)  # fmt: skip
    if kind == 7:  # the caller's own deadline, spent at once
        return Session("deadline", {**GOOD, "grpc-timeout": "1n"}, frames=(text(OPEN),),
                       closes=REFUSED)  # fmt: skip
    return Session("connection close", {**GOOD, "Connection": "close"}, upgrade=False)


MB_STRINGS = ["p" * MB, "\u00e9" * (MB // 6), "[/INST]" * (MB // 7)]
"""1 MB in a message each (JSON writes "é" as a 6-character escape)."""


def huge_values(big: str) -> list[dict[str, object]]:
    """A 1 MB value in each field an error might echo."""
    return [
        {"open": {"policy": big}},
        {"open": {"threshold": big}},
        {"open": {"checkTokens": big}},
        {"open": {"categoryThresholds": {big: 0.5}}},
        {"open": {"categoryThresholds": {"illegal": big}}},
        {"open": {"prompt": big}},
        {"open": {"messages": [{"role": big, "content": "hi"}]}},
        {"open": {"messages": [{"role": "user", "content": big}]}},
        {"open": {}, big: 1},
        {"open": {}, "delta": big},
        {"open": {}, "deltaBytes": big},
    ]


def huge_value_message(rng: random.Random) -> dict[str, object]:
    return rng.choice(huge_values(rng.choice(MB_STRINGS)))


def hostile_frames(rng: random.Random) -> tuple[str, list[bytes], frozenset[int]]:
    """(kind, frames, the close codes it may get) after a good handshake; no codes: the
    caller hangs up instead of reading."""
    kind = rng.randrange(14)
    if kind == 0:
        printable = bytes(rng.randint(32, 126) for _ in range(200))
        garbage = rng.choice([b"{", b"nope", b"{'open': {}}", b"\x00", b"", b"[]", b"null",
                              b"5", b'"open"', printable])  # fmt: skip
        return "invalid JSON", [raw_text(garbage)], REFUSED
    if kind == 1:
        depth = rng.choice([33, 1000, 50_000])
        nested = rng.choice(
            [("[" * depth + "]" * depth), ('{"open":' * depth + "{}" + "}" * depth)]
        )
        return "deep nesting", [raw_text(nested)], REFUSED
    if kind == 2:
        digits = "9" * rng.choice([4301, 5000, 100_000])
        where = rng.choice(['{"open": {"checkTokens": %s}}', '{"open": {}, "done": %s}',
                            '{"open": {"threshold": %s}}', "%s"])  # fmt: skip
        return "huge integer", [raw_text(where % digits)], REFUSED
    if kind == 3:
        key = rng.choice(["nope", "x" * 100_000, "open.prompt", "\x00"])
        message = rng.choice([{"open": {}, key: 1}, {"open": {key: {"a": [1]}}},
                              {"open": {"messages": [{"role": "user", key: 1}]}}])  # fmt: skip
        return "unknown field", [text(message)], REFUSED
    if kind == 4:
        payload = rng.choice([b"\xff\xfe\xfd", bytes(rng.randint(0, 255) for _ in range(300)),
                              json.dumps(OPEN).encode(), b""])  # fmt: skip
        return "binary", [frame(BINARY, payload)], REFUSED
    if kind == 5:  # not UTF-8 in a text frame, also split across a continuation
        if rng.random() < 0.5:
            return "invalid UTF-8 text", [frame(TEXT, b'{"delta": "\xff\xfe"}')], codes(1007)
        return "invalid UTF-8 text", [frame(TEXT, b'{"delta": "\xe2', fin=False),
                                      frame(CONTINUATION, b'\x28\xa1"}')], codes(1007)  # fmt: skip
    if kind == 6:  # the payload is never sent: the header alone is past the limit
        over = rng.choice([MAX_MESSAGE_BYTES + 1, 2**31, 2**63 - 1])
        if rng.random() < 0.5:
            return "over the size limit", [frame(TEXT, length=over)], codes(1009)
        # fragments: the limit counts the whole message (a first one of 1 MB must arrive
        # within the idle timeout even on a loaded machine)
        size = rng.choice([10, MAX_MESSAGE_BYTES // 2])
        first = frame(TEXT, b" " * size, fin=False)
        return (
            "over the size limit",
            [first, frame(CONTINUATION, length=MAX_MESSAGE_BYTES - size)],
            codes(1009),
        )
    if kind == 7:
        message = rng.choice([{"open": []}, {"open": "x"}, {"open": None, "delta": 5},
                              {"open": {}, "delta": {"a": 1}}, {"open": {}, "done": "yes"},
                              {"open": {"checkTokens": "x"}}, {"open": {"threshold": "NaN"}},
                              {"open": {"threshold": -1e308}}, {"open": {"messages": {}}},
                              {"open": {"messages": [[]]}}, {"open": {}, "deltaBytes": "!!"},
                              {"open": {"checkTokens": 2**40}}, [OPEN], "open", 5,
                              None])  # fmt: skip
        # some are coerced ("!!" is empty base64), open a check and may find them all taken
        return "wrong types", [text(message)], REFUSED | RETRY
    if kind == 8:
        return "huge values", [text(huge_value_message(rng))], REFUSED | RETRY
    if kind == 9:
        order = rng.choice([
            [{"delta": "hi"}, OPEN, DONE],
            [OPEN, OPEN],
            [{**OPEN, "delta": "hello there", "done": True}, {"delta": "more"}, DONE, OPEN],
            [DONE],
            [OPEN, DONE, DONE],
            [OPEN, {"deltaBytes": "4oI="}, DONE],  # half of a 3-byte character, then done
        ])  # fmt: skip
        return "out of order", [text(m) for m in order], ENDED | REFUSED | RETRY
    if kind == 10:
        at = rng.choice(["after the handshake", "mid-stream", "mid-frame"])
        frames = [] if at == "after the handshake" else [text(OPEN), text({"delta": "some words "})]
        if at == "mid-frame":
            frames.append(frame(TEXT, b'{"delta": "abc"}', length=5000)[:40])
        return "abrupt disconnect", frames, frozenset()
    if kind == 11:
        pings = [frame(rng.choice([PING, PONG]), bytes(rng.randint(0, 125)))
                 for _ in range(rng.choice([100, 1000, 3000]))]  # fmt: skip
        if rng.random() < 0.5:  # then silence: pings are no messages, the idle timeout ends it
            return "ping flood", pings, REFUSED | RETRY
        return "ping flood", pings + good_stream(rng), ENDED | RETRY
    if kind == 12:
        broken, closes = rng.choice([
            (frame(TEXT, b"{}", rsv=rng.choice([1, 2, 4, 7])), codes(1002)),
            (frame(rng.choice([0x3, 0x7, 0xB, 0xF]), b"x"), codes(1002)),
            (frame(PING, b"p" * 126), codes(1002)),
            (frame(PING, b"p", fin=False), codes(1002)),
            (frame(CONTINUATION, b"{}"), codes(1002)),
            (frame(TEXT, b'{"open":', fin=False) + frame(TEXT, b"{}}"), codes(1002)),
            (frame(CLOSE, b"\x03"), codes(1002)),
            # the caller closes: with a code it may send (echoed as 1000) or one it may not
            (close_frame(rng.choice([0, 999, 1000, 1004, 1005, 1006, 1015, 2999, 5000])),
             codes(1000, 1002)),
            (close_frame(1000, b"\xff\xfe"), codes(1007)),
            # aiohttp reads an unmasked frame (RFC 6455 5.1 says to fail the connection): "{}"
            # is then an empty message, and the caller falls silent
            (frame(TEXT, b"{}", mask=False), REFUSED),
        ])  # fmt: skip
        return "protocol violation", [text(OPEN), broken], closes | RETRY
    return "good stream", good_stream(rng), ENDED | RETRY


def sessions() -> Iterator[Session]:
    rng = random.Random(SEED)
    for _ in range(SESSIONS):
        if rng.random() < 0.3:
            yield hostile_handshake(rng)
        else:
            kind, frames, closes = hostile_frames(rng)
            yield Session(kind, GOOD, frames=tuple(frames), hang_up=not closes, closes=closes)


@dataclass
class Outcome:
    session: Session
    status: int
    headers: dict[str, str]
    body: bytes = b""
    closing: Closing | None = None


def play(port: int, session: Session) -> Outcome:
    with RawWebSocket(port) as ws:
        answer = ws.handshake(session.headers, session.method)
        if answer.status != 101:
            return Outcome(session, answer.status, answer.headers, answer.body)
        for data in session.frames:
            if not ws.send(data):
                break  # the server closed already: read what it said
        if session.hang_up:
            ws.abort()
            return Outcome(session, 101, answer.headers)
        closing = ws.read_until_close(timeout=IDLE + 20)
        return Outcome(session, 101, answer.headers, closing=closing)


def problems(outcome: Outcome) -> list[str]:
    """What is wrong with one session's outcome, if anything."""
    session, closing = outcome.session, outcome.closing
    name = f"{session.kind} ({session.method}, {len(b''.join(session.frames)):,} B sent)"
    found = []
    if outcome.status >= 500:
        found.append(f"{name}: handshake answered {outcome.status} {outcome.body[:200]!r}")
    if len(outcome.body) >= MAX_TEXT_CHARS:
        found.append(f"{name}: a {len(outcome.body)}-byte handshake answer")
    if outcome.status == 101 and not session.upgrade:
        found.append(f"{name}: upgraded a request that should be refused")
    if outcome.status != 101 and session.upgrade:
        found.append(f"{name}: refused a good upgrade ({outcome.status} {outcome.body[:200]!r})")
    if "sec-websocket-extensions" in outcome.headers:  # inflating runs on the event loop
        found.append(f"{name}: negotiated {outcome.headers['sec-websocket-extensions']!r}")
    if closing is None:
        return found
    if closing.timed_out:
        found.append(f"{name}: the server never closed the connection")
    elif closing.close_code not in ALLOWED_CLOSE & session.closes:
        found.append(f"{name}: closed with {closing.close_code} {closing.close_reason[:100]!r}, "
                     f"expected one of {sorted(session.closes)}")  # fmt: skip
    if len(closing.close_reason) > 64:
        found.append(f"{name}: a {len(closing.close_reason)}-byte close reason")
    for message in closing.texts:
        if len(message) >= MAX_TEXT_CHARS:
            found.append(f"{name}: a {len(message)}-character message {message[:100]!r}")
        error = json.loads(message).get("error")
        if error is None:
            continue
        if error["status"] in ("INTERNAL", "UNKNOWN"):
            found.append(f"{name}: {error}")
        for key in ("message", "field"):
            if len(error[key] or "") > MAX_ERROR_CHARS + 3:
                found.append(f"{name}: error {key} of {len(error[key])} characters")
    return found


class HealthWatch:
    """Health on both transports every 50 ms while the replay runs: failures and latencies."""

    def __init__(self, served: InProcessServer):
        self.channel = grpc.insecure_channel(served.address)
        self.port = served.settings.http_port
        self.latencies: dict[str, list[float]] = {"grpc": [], "http": []}
        self.failures: list[str] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _probe(self, transport: str, check: Callable[[], bool]) -> None:
        start = time.monotonic()
        try:
            if not check():
                self.failures.append(f"{transport}: not serving")
        except (grpc.RpcError, OSError) as exc:
            self.failures.append(f"{transport}: {exc!r}"[:200])
        self.latencies[transport].append(time.monotonic() - start)

    def _watch(self) -> None:
        while not self.done.is_set():
            self._probe("grpc", lambda: health_status(self.channel) == SERVING)
            self._probe("http", lambda: http_send(self.port, *HTTP_HEALTH, b"", {})[0] == 200)
            time.sleep(0.05)

    def __enter__(self) -> HealthWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(10)

    def worst_ms(self, transport: str) -> float:
        return round(1000 * max(self.latencies[transport], default=0.0), 1)


@pytest.fixture(scope="module")
def served(demo_checkpoint: Path) -> Iterator[InProcessServer]:
    with demo_server(
        demo_checkpoint,
        auth_token=TOKEN,
        max_text_chars=4000,
        max_messages=16,
        max_message_bytes=MAX_MESSAGE_BYTES,
        max_stream_checks=6,  # fewer than the 8 senders: a few sessions are told to retry (1013)
        stream_max_answer_chars=2000,
        stream_idle_timeout=IDLE,
        http_port=free_port(),
    ) as server:
        yield server


def free_slots(served: InProcessServer) -> int:
    worker = served.server.state.worker
    assert isinstance(worker, WorkerThread)
    return worker.scheduler.engine.free_slots


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_hostile_websocket_sessions_close_cleanly_and_health_answers(
    served: InProcessServer,
) -> None:
    port = served.settings.http_port
    free = free_slots(served)
    work = list(sessions())
    start = time.monotonic()
    with HealthWatch(served) as health, concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda s: play(port, s), work))
    closes = collections.Counter(o.closing.close_code for o in outcomes if o.closing)
    by_kind: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for o in outcomes:
        by_kind[o.session.kind][str(o.closing.close_code if o.closing else o.status)] += 1
    figures = {
        "sessions": len(outcomes),
        "kinds": dict(collections.Counter(s.kind for s in work)),
        "handshakes": dict(collections.Counter(o.status for o in outcomes)),
        "close_codes": {str(k): v for k, v in sorted(closes.items(), key=str)},
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "seconds": round(time.monotonic() - start, 1),
        "health_checks": len(health.latencies["grpc"]),
        "worst_grpc_health_ms": health.worst_ms("grpc"),
        "worst_http_health_ms": health.worst_ms("http"),
    }
    print(json.dumps(figures))
    if os.environ.get("HOSTILE_REPORT"):
        Path(os.environ["HOSTILE_REPORT"] + ".websocket").write_text(json.dumps(figures, indent=2))
    bad = [p for o in outcomes for p in problems(o)]
    assert not bad, bad[:10]
    assert not health.failures, health.failures[:10]
    assert len(health.latencies["grpc"]) > 10
    assert max(health.latencies["grpc"]) < 1.0 and max(health.latencies["http"]) < 1.0, figures
    # Nothing held: every check closed, its cache slot freed, and a good stream still works.
    assert wait_until(lambda: served.server.state.open_checks == 0)
    assert wait_until(lambda: free_slots(served) == free)
    assert_a_good_stream_works(port)


def assert_a_good_stream_works(port: int) -> None:
    with RawWebSocket(port) as ws:
        assert ws.handshake(GOOD).status == 101
        for data in good_stream(random.Random(0)):
            assert ws.send(data)
        closing = ws.read_until_close(timeout=60)
    assert closing.close_code == 1000, closing
    last = json.loads(closing.texts[-1])["result"]
    assert last["complete"] and int(last["checkedTokens"]) > 0


# ------------------------------------------------ the limits the replay relies on, one by one


def test_a_message_has_the_limits_of_a_request_body() -> None:
    """Nesting, huge integers and JSON values are refused before anything walks the message,
    and the counts (here `open.messages`) before json_format parses it, as for every body."""
    limits = Limits(max_items=8, max_messages=16)
    refused = {
        "[" * 50_000 + "]" * 50_000: "nests deeper than 32 levels",
        '{"open": {"checkTokens": ' + "9" * 5000 + "}}": "not JSON",
        "[" + "0," * 5000 + "0]": "JSON values",
        "": "not JSON",
        "{": "not JSON",
    }
    for data, reason in refused.items():
        with pytest.raises(InvalidArgument) as info:
            parse_message(data, limits)
        assert info.value.field == "message" and reason in info.value.message, info.value
    many = json.dumps({"open": {"messages": [{"role": "user", "content": "a"}] * 17}})
    with pytest.raises(InvalidArgument) as info:
        parse_message(many, limits)
    assert info.value.field == "open.messages" and "MODERATION_MAX_MESSAGES" in str(info.value)
    with pytest.raises(InvalidArgument) as info:
        parse_message(json.dumps({"open": {}, "x" * 100_000: 1}), limits)
    assert len(str(info.value)) < 200  # the key is quoted, not echoed


def test_large_messages_are_parsed_on_the_planning_threads(
    served: InProcessServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message past planning_threads.INLINE_BYTES (2 KiB: at most ~1.5 ms on the loop
    whatever its shape, bench/websocket_frames.py) is parsed where request bodies are
    decoded."""
    threads: dict[int, str] = {}
    decode = bodies.decode

    def recording(data: bytes, *args: Any, **kwargs: Any) -> Any:
        threads[len(data)] = threading.current_thread().name
        return decode(data, *args, **kwargs)

    monkeypatch.setattr(bodies, "decode", recording)
    small = json.dumps({"open": {"prompt": "p" * 100}, "delta": "hi", "done": True})
    large = json.dumps({"open": {"prompt": "p" * 3000}, "delta": "hi", "done": True})
    for message in (small, large):
        with RawWebSocket(served.settings.http_port) as ws:
            assert ws.handshake(GOOD).status == 101
            ws.send(raw_text(message))
            assert ws.read_until_close(timeout=60).close_code in ENDED | RETRY
    assert threads[len(small)] == "MainThread" or not threads[len(small)].startswith("plan")
    assert threads[len(large)].startswith("plan"), threads


def test_huge_values_are_never_echoed_whole(served: InProcessServer) -> None:
    """Every field an error might quote, 1 MB long: the answer quotes a prefix at most, and
    the message and field stay within the cap of every error (MAX_ERROR_CHARS)."""
    for message in huge_values(MB_STRINGS[1]):
        with RawWebSocket(served.settings.http_port) as ws:
            assert ws.handshake(GOOD).status == 101
            ws.send(text(message))
            closing = ws.read_until_close(timeout=60)
        assert closing.close_code in REFUSED | RETRY, (closing, list(message))
        error = json.loads(closing.texts[-1])["error"]
        # (a base64 field drops what is not base64: deltaBytes is then empty, the caller idle)
        assert error["status"] in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")
        assert len(error["message"]) <= MAX_ERROR_CHARS + 3, error["message"][:200]
        assert len(error["field"] or "") <= MAX_ERROR_CHARS + 3, error["field"][:200]


def test_pings_do_not_keep_a_silent_stream_open(served: InProcessServer) -> None:
    """Pings are answered but are no messages: a caller that only pings is idle, and its
    check ends after the idle timeout (DEADLINE_EXCEEDED, 1008) while it still pings."""
    with RawWebSocket(served.settings.http_port) as ws:
        assert ws.handshake(GOOD).status == 101
        assert ws.send(text(OPEN))
        start = time.monotonic()
        while time.monotonic() - start < IDLE * 4:
            ws.send(frame(PING, b"still here"))
            closing = ws.read_until_close(timeout=0.05)
            if not closing.timed_out:
                break
    assert closing.close_code == 1008 and closing.close_reason == b"DEADLINE_EXCEEDED", closing
    assert time.monotonic() - start < IDLE * 4
    assert "MODERATION_STREAM_IDLE_TIMEOUT" in json.loads(closing.texts[-1])["error"]["message"]


def test_the_server_offers_no_compression(served: InProcessServer) -> None:
    """aiohttp inflates a compressed message on the event loop (a 4 KB frame of spaces costs
    the loop what 4 MiB of wire does): the route accepts no permessage-deflate offer."""
    with RawWebSocket(served.settings.http_port) as ws:
        offer = {**GOOD, "Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}
        answer = ws.handshake(offer)
    assert answer.status == 101 and "sec-websocket-extensions" not in answer.headers
