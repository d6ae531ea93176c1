"""The servicer's context for a call that came over HTTP.

HTTP calls are answered by the gRPC servicer itself, in this process (see the package's
docstring for why): this is the part of grpc.aio.ServicerContext the servicer uses (abort,
trailing metadata, the deadline), recording what a gRPC call would have sent back.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, NoReturn

import grpc

from moderation.serving.http.status import CallError, field_of


class HttpContext:
    """What a servicer method sees of an HTTP call: its deadline; what it leaves: its status."""

    def __init__(self, deadline: float | None = None):
        self._deadline = deadline  # time.monotonic() seconds, or None
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: Sequence[tuple[str, Any]] = ()

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, Any]]) -> None:
        self._trailing = tuple(metadata)

    def trailing_metadata(self) -> Sequence[tuple[str, Any]]:
        return self._trailing

    def invocation_metadata(self) -> Sequence[tuple[str, Any]]:
        return ()

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Sequence[tuple[str, Any]] = (),
    ) -> NoReturn:
        # grpc.aio raises AbortError out of abort(); the servicer lets exactly that through.
        self._code, self._details = code, details
        if trailing_metadata:
            self._trailing = tuple(trailing_metadata)
        raise grpc.aio.AbortError()

    def error(self) -> CallError:
        """The status the servicer aborted with, as the HTTP error to send."""
        code = self._code or grpc.StatusCode.UNKNOWN
        return CallError(code, self._details, field_of(self._trailing))
