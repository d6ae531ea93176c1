"""The front's writes to the model process (moderation.serving.worker.pipe_writer): framed as
`Connection.send` frames them, in order, and never blocking the event loop when the model
process does not read."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from typing import Any

from moderation.serving.worker.pipe_writer import PipeWriter, frame


def test_frames_are_those_of_connection_send() -> None:
    here, there = multiprocessing.Pipe()
    for message in ({"a": 1}, "x" * 100_000):  # one write, and header then payload
        here.send(message)
        raw = there.recv_bytes()
        header, payload = frame(message)
        assert int.from_bytes(header, "big") == len(payload) == len(raw)
        assert bytes(payload) == raw


def test_a_model_process_that_does_not_read_never_blocks_the_loop() -> None:
    here, there = multiprocessing.Pipe()
    big = [b"x" * 1_000_000, b"y" * 3_000_000]  # far more than a socket buffer holds
    errors: list[str] = []

    async def write_all() -> tuple[int, int]:
        writer = PipeWriter(here.fileno(), asyncio.get_running_loop(), lambda: errors.append("x"))
        for i, chunk in enumerate(big):
            writer.write((i, chunk))
        writer.write((2, b"small"))
        pending = writer.backlog_bytes
        received: list[Any] = []
        reader = threading.Thread(target=lambda: received.extend(there.recv() for _ in range(3)))
        reader.start()  # the model process reads at last: the loop's writer callback goes on
        while reader.is_alive():
            await asyncio.sleep(0.01)
        assert [m[0] for m in received] == [0, 1, 2]  # in order, whole
        assert received[1][1] == big[1] and received[2][1] == b"small"
        left = writer.backlog_bytes
        writer.close()
        return pending, left

    # Had a write blocked, the reader would never have started: the loop's thread returns only
    # if every write returned while the other end was not reading.
    result: list[tuple[int, int]] = []
    loop_thread = threading.Thread(target=lambda: result.append(asyncio.run(write_all())))
    loop_thread.daemon = True
    loop_thread.start()
    loop_thread.join(30)
    assert result, "a write blocked the event loop while the model process did not read"
    pending, left = result[0]
    assert pending > 1_000_000 and left == 0
    assert not errors


def test_a_closed_other_end_is_reported_once_and_writes_stop() -> None:
    here, there = multiprocessing.Pipe()
    there.close()
    errors: list[str] = []

    async def write() -> None:
        writer = PipeWriter(here.fileno(), asyncio.get_running_loop(), lambda: errors.append("x"))
        writer.write("hello")
        writer.write("again")  # closed: dropped, not reported twice

    asyncio.run(write())
    assert errors == ["x"]
