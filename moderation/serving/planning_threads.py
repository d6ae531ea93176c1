"""Where a caller's input is decoded and planned: on the event loop or on the planning threads.

One rule for every transport (gRPC, HTTP, ModerateStream over gRPC or a WebSocket), decided
here by the size of the bytes the work reads: an HTTP body or WebSocket message to decode, a
request or ModerateStream message to validate and tokenize. Small work runs where it is
(issue #20: a thread hop costs more than the work), larger work on the `--plan-threads`
threads so that the event loop keeps answering, health first (issue #19). A request is planned
at the same place whichever transport brought it: planning is sized by the request message,
not by its JSON.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

INLINE_BYTES = 2 * 1024
"""Work on at most this many bytes runs on the event loop: decoding or tokenizing 2 KiB takes
tens of microseconds, less than the hop to a planning thread and back (two GIL hand-offs)."""

THREAD_PREFIX = "plan"


class PlanningThreads:
    """The planning threads, and the one rule of what runs on them."""

    def __init__(self, threads: int):
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix=THREAD_PREFIX)

    @staticmethod
    def inline(size: int) -> bool:
        """Whether work on `size` bytes of a caller's input runs on the event loop."""
        return size <= INLINE_BYTES

    async def run(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args), work on `size` bytes of a caller's input (a text counts its characters):
        here when small enough (`inline`), else on a planning thread."""
        if self.inline(size):
            return fn(*args)
        return await self.on_threads(fn, *args)

    async def on_threads(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on a planning thread whatever the caller sent: the server's own slow work
        (a ModerateStream's first cut rule)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False)
