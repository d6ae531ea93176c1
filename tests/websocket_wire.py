"""A WebSocket client on a plain socket, for tests that send what a client library refuses to:
handshakes without an upgrade or with a wrong version, text frames that are not UTF-8, reserved
bits, control frames too long, frames over the size limit, connections dropped mid-frame.

Frames follow RFC 6455 section 5: the client masks every frame (unless told not to), the
server's frames are read unmasked and never compressed (the server offers no extension).
"""

from __future__ import annotations

import base64
import os
import socket
import struct
import time
from dataclasses import dataclass, field

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
PATH = "/v1/moderate/stream"
Headers = dict[str, "str | None"]  # None: leave the header out


def masked(payload: bytes, mask: bytes) -> bytes:
    """The payload XOR the repeated mask, as one big-integer operation (fast for megabytes)."""
    whole = (mask * (len(payload) // 4 + 1))[: len(payload)]
    value = int.from_bytes(payload, "big") ^ int.from_bytes(whole, "big")
    return value.to_bytes(len(payload), "big")


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    length: int | None = None,
) -> bytes:
    """One client frame; `length` declares another payload length than the payload's (a frame
    whose payload is never sent whole)."""
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    bit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", first, bit | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, bit | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + masked(payload, key)


def close_frame(code: int | None, reason: bytes = b"") -> bytes:
    return frame(CLOSE, b"" if code is None else struct.pack("!H", code) + reason)


@dataclass
class Handshake:
    """The server's answer to an upgrade request."""

    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Closing:
    """What the server sent after the handshake: its text messages, then how it ended."""

    texts: list[str] = field(default_factory=list)
    close_code: int | None = None  # None: no close frame (the connection just ended)
    close_reason: bytes = b""
    timed_out: bool = False


class RawWebSocket:
    """One connection to the server's HTTP port."""

    def __init__(self, port: int, timeout: float = 30.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""
        self.closing = Closing()  # what the server sent so far

    def __enter__(self) -> RawWebSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def handshake(self, headers: Headers | None = None, method: str = "GET") -> Handshake:
        """Send an upgrade request (a valid one, changed by `headers`) and read the answer."""
        sent: Headers = {
            "Host": "127.0.0.1",
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
            "Sec-WebSocket-Version": "13",
            **(headers or {}),
        }
        lines = [f"{method} {PATH} HTTP/1.1"]
        lines += [f"{k}: {v}" for k, v in sent.items() if v is not None]
        # latin-1, as http.client sends: a non-ASCII character goes out as one invalid byte.
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        head = self._until(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        answer = {}
        for line in header_lines:
            key, _, value = line.partition(":")
            answer[key.strip().lower()] = value.strip()
        status = int(status_line.split()[1])
        body = b""
        if status != 101:
            body = self._exactly(int(answer.get("content-length", "0")))
        return Handshake(status, answer, body)

    def send(self, data: bytes) -> bool:
        """Send bytes; False when the server has closed the connection already."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def abort(self) -> None:
        """Drop the connection without a close frame (SO_LINGER 0: a reset, as a crash does)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def read_until_close(self, timeout: float) -> Closing:
        """The server's frames until its close frame (answered with the same code, as RFC 6455
        asks), the end of the connection, or `timeout` seconds (`timed_out`; call again to
        read on: what came is kept)."""
        closing = self.closing
        closing.timed_out = False
        deadline = time.monotonic() + timeout
        try:
            while True:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                opcode, payload = self._frame()
                if opcode == TEXT:
                    closing.texts.append(payload.decode())
                elif opcode == PING:
                    self.send(frame(PONG, payload))
                elif opcode == CLOSE:
                    if len(payload) >= 2:
                        closing.close_code = struct.unpack("!H", payload[:2])[0]
                        closing.close_reason = payload[2:]
                    self.send(close_frame(closing.close_code))
                    return closing
        except TimeoutError:
            closing.timed_out = True
        except (ConnectionError, EOFError):
            pass
        return closing

    # ------------------------------------------------------------------ reading

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        self.buffer += data

    def _until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            self._fill()
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def _exactly(self, n: int) -> bytes:  # the handshake's body
        while len(self.buffer) < n:
            self._fill()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def _frame(self) -> tuple[int, bytes]:
        """The next whole frame; nothing is consumed until it has all arrived (a timeout in
        the middle leaves it to the next call)."""
        while True:
            size = self._frame_size()
            if size is not None and len(self.buffer) >= size:
                break
            self._fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        opcode, second = data[0] & 0x0F, data[1]
        n, start = second & 0x7F, 2
        if n == 126:
            n, start = struct.unpack("!H", data[2:4])[0], 4
        elif n == 127:
            n, start = struct.unpack("!Q", data[2:10])[0], 10
        if second & 0x80:  # a server never masks; read it anyway
            return opcode, masked(data[start + 4 :], data[start : start + 4])
        return opcode, data[start:]

    def _frame_size(self) -> int | None:
        """The length of the frame at the buffer's start, once its header has arrived."""
        if len(self.buffer) < 2:
            return None
        n, head = self.buffer[1] & 0x7F, 2
        if n == 126:
            if len(self.buffer) < 4:
                return None
            n, head = struct.unpack("!H", self.buffer[2:4])[0], 4
        elif n == 127:
            if len(self.buffer) < 10:
                return None
            n, head = struct.unpack("!Q", self.buffer[2:10])[0], 10
        return head + (4 if self.buffer[1] & 0x80 else 0) + n
