"""gRPC status -> HTTP status, and the JSON error bodies of the HTTP listener.

The mapping is grpc-gateway's (runtime.HTTPStatusFromCode), so that a caller sees the same
status here as behind grpc-gateway or Envoy's transcoder. The offending field of an
INVALID_ARGUMENT comes from the rich status details (google.rpc.BadRequest, which the servicer
attaches to every invalid-argument error), as a gRPC client reads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from moderation.core.errors import prefix
from moderation.serving.calls import capped

StatusCode = grpc.StatusCode

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    StatusCode.OK: 200,
    StatusCode.CANCELLED: 499,  # nginx's "client closed request", as grpc-gateway answers
    StatusCode.UNKNOWN: 500,
    StatusCode.INVALID_ARGUMENT: 400,
    StatusCode.DEADLINE_EXCEEDED: 504,
    StatusCode.NOT_FOUND: 404,
    StatusCode.ALREADY_EXISTS: 409,
    StatusCode.PERMISSION_DENIED: 403,
    StatusCode.UNAUTHENTICATED: 401,
    StatusCode.RESOURCE_EXHAUSTED: 429,
    StatusCode.FAILED_PRECONDITION: 400,
    StatusCode.ABORTED: 409,
    StatusCode.OUT_OF_RANGE: 400,
    StatusCode.UNIMPLEMENTED: 501,
    StatusCode.INTERNAL: 500,
    StatusCode.UNAVAILABLE: 503,
    StatusCode.DATA_LOSS: 500,
}

STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class CallError(Exception):
    """A call that ended with a non-OK status: what the JSON error says.

    `http_status` overrides the mapped status where HTTP has a more precise one (413 for a
    body over the size limit, 405 for a known path with the wrong method).
    """

    code: grpc.StatusCode
    message: str
    field: str | None = None
    http_status: int | None = None

    @property
    def status(self) -> int:
        return self.http_status or HTTP_STATUS.get(self.code, 500)

    def capped(self) -> CallError:
        """The error as it is sent and logged: its message and field within the one cap of
        both transports (`serving.calls.capped`), whatever produced them."""
        field = self.field and capped(self.field)
        return CallError(self.code, capped(self.message), field, self.http_status)

    def body(self) -> dict[str, Any]:
        """The listener's error shape (the proto's service comment documents it)."""
        return {
            "error": {
                "code": self.status,
                "status": self.code.name,
                "message": self.message,
                "field": self.field,
            }
        }


def caller_field(name: str) -> str:
    """A field named by the caller (an unknown key) as an error names it: a 1 MB key must not
    make a 2 MB error."""
    return prefix(name)


def field_of(trailing_metadata: Sequence[tuple[str, Any]]) -> str | None:
    """The field a google.rpc.BadRequest in the status details names, if any."""
    for key, value in trailing_metadata:
        if key != STATUS_DETAILS_KEY:
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            bad = error_details_pb2.BadRequest()
            if detail.Unpack(bad) and bad.field_violations:
                return bad.field_violations[0].field or None
    return None
