"""The ModerationService servicer: validate, hand the work to the model worker, answer.

Domain errors become gRPC status codes in exactly one place (`_status_for`). Every call logs
one JSON line (request id, method, code, latency, tokens, category) and updates the metrics;
the text itself is logged only when the operator turned `log_text` on.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from moderation import convert
from moderation.classifier import Classification, ClassificationError
from moderation.guarded import GenerationResult
from moderation.runtime import Runtime
from moderation.scheduler import (
    ClassifyJob,
    GenerateJob,
    ModelWorker,
    QueueFullError,
    WorkerStoppedError,
)
from moderation.settings import ServeSettings
from moderation.telemetry import Metrics
from moderation.v1 import moderation_pb2 as pb
from moderation.v1 import moderation_pb2_grpc as pb_grpc

log = structlog.get_logger("moderation.requests")


class NotReadyError(Exception):
    """The model is still loading."""


@dataclass
class ServiceState:
    """What the servicer reads; `runtime` and `worker` appear once the model has loaded."""

    settings: ServeSettings
    metrics: Metrics
    runtime: Runtime | None = None
    worker: ModelWorker | None = None
    draining: bool = False
    in_flight: int = 0  # RPCs of ModerationService being handled now


@dataclass
class _Call:
    """One RPC's facts for its log line and metrics."""

    method: str
    request_id: str
    start: float = field(default_factory=time.perf_counter)
    code: grpc.StatusCode = grpc.StatusCode.OK
    fields: dict[str, Any] = field(default_factory=dict)


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, str | None]:
    """(code, message, offending field) for a domain error: the one mapping of the service."""
    if isinstance(exc, ClassificationError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.field
    if isinstance(exc, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), None
    if isinstance(exc, NotReadyError | WorkerStoppedError):
        return grpc.StatusCode.UNAVAILABLE, str(exc), None
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}", None


class ModerationServicer(pb_grpc.ModerationServiceServicer):
    def __init__(self, state: ServiceState):
        self.state = state

    # ------------------------------------------------------------ plumbing

    def _begin(self, method: str, context: grpc.aio.ServicerContext) -> _Call:
        metadata = dict(context.invocation_metadata() or ())
        request_id = str(metadata.get("x-request-id") or uuid.uuid4())
        self.state.in_flight += 1
        return _Call(method, request_id)

    def _end(self, call: _Call) -> None:
        self.state.in_flight -= 1
        latency = time.perf_counter() - call.start
        m = self.state.metrics
        m.requests.labels(method=call.method, code=call.code.name).inc()
        m.latency.labels(method=call.method).observe(latency)
        log.info(
            "request",
            request_id=call.request_id,
            method=call.method,
            code=call.code.name,
            latency_ms=round(latency * 1000, 2),
            **call.fields,
        )

    async def _abort(
        self, call: _Call, context: grpc.aio.ServicerContext, exc: BaseException
    ) -> None:
        code, message, bad_field = _status_for(exc)
        call.code = code
        call.fields["error"] = message
        if code is grpc.StatusCode.INTERNAL:
            log.exception("request failed", request_id=call.request_id, exc_info=exc)
        if bad_field is not None:
            # Rich details: a BadRequest naming the field, for clients that read them.
            detail = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=bad_field, description=message
                    )
                ]
            )
            status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message)
            status.details.add().Pack(detail)
            await context.abort_with_status(rpc_status.to_status(status))
        await context.abort(code, message)

    def _ready(self) -> tuple[Runtime, ModelWorker]:
        if self.state.draining:
            raise WorkerStoppedError("the server is shutting down")
        if self.state.runtime is None or self.state.worker is None:
            raise NotReadyError("the model is still loading")
        return self.state.runtime, self.state.worker

    def _check_chars(self, text: str, name: str) -> None:
        limit = self.state.settings.max_text_chars
        if len(text) > limit and self.state.settings.long_text != "split":
            raise ClassificationError(name, f"{len(text)} characters exceed the limit of {limit}")

    def _record(self, call: _Call, results: list[Classification], texts: list[str]) -> None:
        m = self.state.metrics
        for r in results:
            m.decisions.labels(
                policy=r.policy, category=r.category, flagged=str(r.flagged).lower()
            ).inc()
            m.tokens.labels(kind="prompt").inc(r.prompt_tokens)
        call.fields["prompt_tokens"] = sum(r.prompt_tokens for r in results)
        if len(results) == 1:
            call.fields.update(category=results[0].category, flagged=results[0].flagged)
        else:
            call.fields["items"] = len(results)
        if self.state.settings.log_text:
            call.fields["text"] = texts[0] if len(texts) == 1 else texts

    async def _classify(
        self, items: list[Any], context: grpc.aio.ServicerContext
    ) -> list[Classification]:
        _, worker = self._ready()
        loop = asyncio.get_running_loop()
        job = ClassifyJob(loop=loop, planned=items, future=loop.create_future())
        worker.submit(job)
        try:
            assert job.future is not None
            return await job.future
        except asyncio.CancelledError:
            worker.cancel(job)  # the client went away or its deadline passed: drop the work
            raise

    async def _handle(
        self,
        name: str,
        context: grpc.aio.ServicerContext,
        body: Callable[[_Call], Awaitable[Any]],
    ) -> Any:
        """Run one unary RPC: its log line and metrics, and its errors mapped to a status."""
        call = self._begin(name, context)
        try:
            return await body(call)
        except asyncio.CancelledError:  # the client cancelled or its deadline passed
            call.code = grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await self._abort(call, context, exc)
            raise AssertionError("unreachable") from exc
        finally:
            self._end(call)

    # ----------------------------------------------------------------- RPCs

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        async def body(call: _Call) -> pb.ClassifyResponse:
            runtime, _ = self._ready()
            self._check_chars(request.text, "text")
            self._check_chars(request.prompt, "prompt")
            planned = runtime.classifier.plan(convert.classify_item(request))
            result = (await self._classify([planned], context))[0]
            self._record(call, [result], [request.text])
            return convert.classify_response(result)

        return await self._handle("Classify", context, body)

    async def ClassifyBatch(
        self, request: pb.ClassifyBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyBatchResponse:
        async def body(call: _Call) -> pb.ClassifyBatchResponse:
            runtime, _ = self._ready()
            limit = self.state.settings.max_batch_items
            if not request.requests:
                raise ClassificationError("requests", "must not be empty")
            if len(request.requests) > limit:
                raise ClassificationError(
                    "requests", f"{len(request.requests)} items exceed the limit of {limit}"
                )
            planned = []
            for i, item in enumerate(request.requests):
                try:
                    self._check_chars(item.text, "text")
                    self._check_chars(item.prompt, "prompt")
                    planned.append(runtime.classifier.plan(convert.classify_item(item)))
                except ClassificationError as exc:
                    raise ClassificationError(f"requests[{i}].{exc.field}", exc.message) from exc
            results = await self._classify(planned, context)
            self._record(call, results, [r.text for r in request.requests])
            return pb.ClassifyBatchResponse(results=[convert.classify_response(r) for r in results])

        return await self._handle("ClassifyBatch", context, body)

    async def _generate(
        self, request: pb.GenerateRequest, call: _Call
    ) -> AsyncIterator[tuple[str, Any]]:
        runtime, worker = self._ready()
        for i, m in enumerate(request.messages):
            self._check_chars(m.content, f"messages[{i}].content")
        limit = self.state.settings.max_new_tokens
        if request.max_new_tokens > limit:
            raise ClassificationError("max_new_tokens", f"must be at most {limit}")
        options = convert.generate_options(request, limit)
        prep = runtime.generator.prepare(convert.messages(request), options)
        loop = asyncio.get_running_loop()
        job = GenerateJob(loop=loop, prep=prep, events=asyncio.Queue())
        worker.submit(job)
        if self.state.settings.log_text:
            call.fields["text"] = prep.user_prompt
        try:
            assert job.events is not None
            while True:
                kind, value = await job.events.get()
                if kind == "error":
                    raise value
                yield kind, value
                if kind == "final":
                    return
        finally:
            worker.cancel(job)  # a no-op once finished; otherwise stop generating for nobody

    def _record_generation(self, call: _Call, result: GenerationResult) -> None:
        m = self.state.metrics
        m.tokens.labels(kind="prompt").inc(result.prompt_tokens)
        m.tokens.labels(kind="completion").inc(result.completion_tokens)
        call.fields.update(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            finish_reason=result.finish_reason,
        )
        for mod in (result.input_moderation, result.output_moderation):
            if mod is not None:
                m.decisions.labels(
                    policy=mod.policy, category=mod.category, flagged=str(mod.flagged).lower()
                ).inc()

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        async def body(call: _Call) -> pb.GenerateResponse:
            async for kind, value in self._generate(request, call):
                if kind == "final":
                    self._record_generation(call, value)
                    return convert.generate_response(value)
            raise RuntimeError("generation ended without a result")

        return await self._handle("Generate", context, body)

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        call = self._begin("GenerateStream", context)
        try:
            async for kind, value in self._generate(request, call):
                if kind == "delta":
                    yield pb.GenerateStreamResponse(delta=value)
                    continue
                self._record_generation(call, value)
                if request.moderate_output and value.text:
                    # Checked as a whole, released as a whole (see the proto).
                    yield pb.GenerateStreamResponse(delta=value.text)
                yield pb.GenerateStreamResponse(final=convert.generate_response(value))
        except asyncio.CancelledError:
            call.code = grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await self._abort(call, context, exc)
        finally:
            self._end(call)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        async def body(call: _Call) -> pb.ModelInfo:
            runtime, _ = self._ready()
            classifier, engine = runtime.classifier, runtime.engine
            return pb.ModelInfo(
                model=runtime.model_id,
                demo=runtime.demo,
                dtype=runtime.dtype,
                device=runtime.device,
                attention_backend=engine.backend.name,
                sliding_window=engine.window,
                max_context_tokens=engine.max_context or engine.args.max_seq_len,
                default_policy=classifier.default_policy,
                policies=convert.policy_info(list(classifier.policies.values())),
            )

        return await self._handle("GetModelInfo", context, body)
