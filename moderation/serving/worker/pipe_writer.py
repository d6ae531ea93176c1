"""Messages to the model process, written from the event loop without ever blocking it.

Why not a sender thread (as before): under load every hand-over woke that thread, and each
wake-up cost the front two context switches and a GIL hand-off per loop iteration, a tenth of
its CPU per Classify (`bench/service_bench.py`, docs/benchmarks.md). Pickling stays where it
was in effect: a thread held the GIL while it pickled too.

The frames are those of `multiprocessing.connection.Connection.send` (a 4-byte big-endian
length, then the pickle), so the model process reads them with `Connection.recv`. The socket
stays blocking for the reads of the same connection; each write asks not to block
(MSG_DONTWAIT) and what the socket does not take waits for the loop's writer callback.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

# Connection.send's framing: a signed 32-bit length; longer payloads use a second header.
_SHORT_MAX = 0x7FFFFFFF


def frame(message: Any) -> tuple[bytes, memoryview]:
    """`message` as Connection.send writes it: (header, pickle). A plain pickle, which
    Connection.recv reads as well: the messages hold no file descriptors or shared memory, for
    which ForkingPickler is built, and its set-up per message cost a third of the pickling."""
    payload = memoryview(pickle.dumps(message))
    if len(payload) > _SHORT_MAX:
        return struct.pack("!i", -1) + struct.pack("!Q", len(payload)), payload
    return struct.pack("!i", len(payload)), payload


class PipeWriter:
    """Non-blocking writes of framed messages to a Connection's socket, from one event loop."""

    def __init__(self, fileno: int, loop: asyncio.AbstractEventLoop, on_error: Callable[[], None]):
        # A duplicate of the connection's socket: the original stays blocking for its reads.
        self._socket = socket.socket(fileno=os.dup(fileno))
        self._loop = loop
        self._on_error = on_error  # the model process is gone (the reader reports it)
        self._backlog: deque[memoryview] = deque()
        self._waiting = False  # registered with the loop for writability
        self._closed = False

    @property
    def backlog_bytes(self) -> int:
        """Bytes written but not yet taken by the socket (the model process is busy)."""
        return sum(len(chunk) for chunk in self._backlog)

    def write(self, message: Any) -> None:
        """Frame `message` and write what the socket takes now; the rest follows in order."""
        if self._closed:
            return
        header, payload = frame(message)
        if len(payload) <= 16384:  # one write for a small message, as Connection.send does
            self._backlog.append(memoryview(header + payload))
        else:
            self._backlog.extend((memoryview(header), payload))
        if not self._waiting:
            self._flush()

    def _flush(self) -> None:
        while self._backlog:
            chunk = self._backlog[0]
            try:
                sent = self._socket.send(chunk, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.close()
                self._on_error()
                return
            if sent == len(chunk):
                self._backlog.popleft()
            else:
                self._backlog[0] = chunk[sent:]
        wait = bool(self._backlog)
        if wait != self._waiting:
            self._waiting = wait
            if wait:
                self._loop.add_writer(self._socket.fileno(), self._flush)
            else:
                self._loop.remove_writer(self._socket.fileno())

    def close(self) -> None:
        """Stop writing (what is left is dropped: the model process is gone or stopping)."""
        if self._closed:
            return
        self._closed = True
        if self._waiting:
            self._loop.remove_writer(self._socket.fileno())
            self._waiting = False
        self._backlog.clear()
        self._socket.close()
