"""Domain errors -> status in one place (`serving.grpc.errors`) for every RPC, streaming ones
included: the servicer's bodies raise, the mapping answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from moderation.core.errors import InvalidArgument
from moderation.serving.calls import CallRecord, bind_call
from moderation.serving.grpc.errors import RPCS, mapped_errors
from moderation.serving.grpc.servicer import ModerationServicer, ServiceState
from moderation.serving.http.context import HttpContext
from moderation.serving.metrics import Metrics
from moderation.serving.settings import ServeSettings
from moderation.serving.worker import QueueFullError
from moderation.v1 import moderation_pb2 as pb


async def _opened() -> AsyncIterator[pb.ModerateStreamRequest]:
    """ModerateStream's request stream: one message that opens, sends and ends the answer."""
    yield pb.ModerateStreamRequest(open=pb.ModerateStreamOpen(), delta="x", done=True)


REQUESTS = {
    "Classify": pb.ClassifyRequest(text="x"),
    "ClassifyBatch": pb.ClassifyBatchRequest(requests=[pb.ClassifyRequest(text="x")]),
    "Generate": pb.GenerateRequest(),
    "GenerateStream": pb.GenerateStreamRequest(),
    "GetModelInfo": pb.GetModelInfoRequest(),
    "ModerateStream": _opened(),
}


async def call(method: Any, request: Any, context: HttpContext) -> None:
    bind_call(CallRecord("test", "id"))
    result = method(request, context)
    if hasattr(result, "__aiter__"):
        async for _ in result:
            pass
    else:
        await result


@pytest.mark.parametrize("name", RPCS)
def test_every_rpc_answers_a_domain_error_with_its_status(name: str) -> None:
    state = ServiceState(ServeSettings(), Metrics.create())  # no model yet: NotReadyError
    servicer = ModerationServicer(state)
    context = HttpContext()
    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(call(getattr(servicer, name), REQUESTS[name], context))
    assert context.code() == grpc.StatusCode.UNAVAILABLE
    assert "still loading" in context.details()
    state.planning.shutdown()


def test_the_mapping_names_the_field_and_covers_streams() -> None:
    @mapped_errors
    class Servicer:
        async def Classify(self, request: Any, context: Any) -> Any:
            raise InvalidArgument("text", "must not be empty")

        async def GenerateStream(self, request: Any, context: Any) -> Any:
            yield "delta"
            raise QueueFullError("the queue is full")

    context = HttpContext()
    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(call(Servicer().Classify, None, context))
    assert context.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert context.details() == "text: must not be empty"
    assert context.error().field == "text"  # the BadRequest's field violation
    context = HttpContext()
    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(call(Servicer().GenerateStream, None, context))
    assert context.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
