"""Domain errors -> gRPC status, in one place for every RPC, streaming ones included.

`mapped_errors` wraps each RPC of a servicer class: an exception its body raises becomes the
status `status_for` maps it to; invalid arguments carry a `google.rpc.BadRequest` naming the
field. HTTP calls run the same servicer methods (with `HttpContext`), so they map the same.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
import structlog
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from moderation.core.errors import InvalidArgument
from moderation.serving.calls import REQUEST_ID_KEY, capped, current_call
from moderation.serving.worker import (
    DeadlineExpiredError,
    GenerationFailedError,
    QueueFullError,
    WorkerStoppedError,
)
from moderation.v1 import moderation_pb2 as pb

log = structlog.get_logger("moderation.serving.grpc.servicer")


RPCS = tuple(pb.DESCRIPTOR.services_by_name["ModerationService"].methods_by_name)
"""The service's RPC names: the servicer methods `mapped_errors` wraps."""

C = TypeVar("C", bound=type)


class NotReadyError(Exception):
    """The model is still loading."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, str | None]:
    """(code, message, offending field) for a domain error: the one mapping of the service."""
    if isinstance(exc, InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.field
    if isinstance(exc, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), None
    if isinstance(exc, NotReadyError | WorkerStoppedError):
        return grpc.StatusCode.UNAVAILABLE, str(exc), None
    if isinstance(exc, DeadlineExpiredError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc), None
    if isinstance(exc, GenerationFailedError):  # the server's fault, said plainly
        return grpc.StatusCode.INTERNAL, str(exc), None
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})", None


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """End the call with the status of `exc` (raises grpc.aio.AbortError)."""
    code, message, bad_field = status_for(exc)
    message = capped(message)  # the one cap of both transports (serving.calls)
    bad_field = bad_field and capped(bad_field)  # a field can be a caller's key
    current_call().fields["error"] = message
    if code is grpc.StatusCode.INTERNAL:
        log.error("request failed", exc_info=exc)
    if bad_field is None:
        await context.abort(code, message)
    # Rich details for clients that read them: a BadRequest naming the field.
    violation = error_details_pb2.BadRequest.FieldViolation(field=bad_field, description=message)
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    rich = rpc_status.to_status(status)
    # The details travel in trailing metadata, which would replace the request id set there.
    call = current_call()
    metadata = (*rich.trailing_metadata, (REQUEST_ID_KEY, call.request_id))
    await context.abort(rich.code, rich.details, metadata)


def _mapped(method: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for response in method(self, request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await abort_with(context, exc)

        return stream

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: Any) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with(context, exc)
            raise AssertionError("unreachable") from exc

    return unary


def mapped_errors(cls: C) -> C:
    """A servicer class whose every RPC (unary or streaming, those it defines) maps its errors
    to a status: the bodies raise domain errors and never build a status themselves."""
    for name in RPCS:
        if name in vars(cls):
            setattr(cls, name, _mapped(vars(cls)[name]))
    return cls
