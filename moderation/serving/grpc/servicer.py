"""The ModerationService servicer: validate, hand the work to the model worker, answer.

The RPCs raise domain errors; they become gRPC status codes in one place for every RPC,
streaming included (`moderation.serving.grpc.errors`, `@mapped_errors`). Request logging and
metrics live in the interceptor (`moderation.serving.grpc.interceptors`); the servicer only
adds what it knows to the call's record: token counts, category, and the text when the
operator turned `log_text` on.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from moderation.api import convert
from moderation.core.decision import Classification, PlannedItem
from moderation.core.errors import InvalidArgument
from moderation.core.generation import GenerationResult
from moderation.serving import tracing
from moderation.serving.front import Front
from moderation.serving.grpc import wire
from moderation.serving.grpc.errors import NotReadyError, mapped_errors
from moderation.serving.grpc.interceptors import (
    UNDECODABLE_MESSAGE,
    CallRecord,
    Deferred,
    current_call,
)
from moderation.serving.grpc.moderate_stream import moderate_stream
from moderation.serving.metrics import Metrics
from moderation.serving.planning_threads import PlanningThreads
from moderation.serving.request_limits import Limits
from moderation.serving.settings import ServeSettings
from moderation.serving.worker import (
    Worker,
    WorkerStoppedError,
)
from moderation.v1 import moderation_pb2 as pb
from moderation.v1 import moderation_pb2_grpc as pb_grpc

T = TypeVar("T")

LOGGED_TEXT_CHARS = 200
"""With log_text on, how much of each text the request log keeps."""


@dataclass
class ServiceState:
    """What the servicer reads; `front` and `worker` appear once the model has loaded."""

    settings: ServeSettings
    metrics: Metrics
    front: Front | None = None
    worker: Worker | None = None
    draining: bool = False
    open_checks: int = 0  # ModerateStream calls holding a check (MODERATION_MAX_STREAM_CHECKS)
    # Validation and tokenizing of large requests run on these threads, not on the event loop
    # (a 4 MB request takes ~1 s); the HTTP listener decodes its large bodies on them too.
    planning: PlanningThreads = field(init=False)

    def __post_init__(self) -> None:
        self.planning = PlanningThreads(self.settings.plan_threads)


def _logged(text: str) -> str:
    """A text as the request log keeps it (log_text on): a prefix, never a whole document."""
    if len(text) <= LOGGED_TEXT_CHARS:
        return text
    return f"{text[:LOGGED_TEXT_CHARS]}... ({len(text)} characters)"


def _classified_text(request: pb.ClassifyRequest) -> str:
    """The text a request classifies: `text`, or the last message of `messages`."""
    return request.messages[-1].content if request.messages else request.text


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


@mapped_errors  # every RPC's errors become its status there, streaming included
class ModerationServicer(pb_grpc.ModerationServiceServicer):
    def __init__(self, state: ServiceState):
        self.state = state

    # ---------------------------------------------------------------- helpers

    def _ready(self) -> tuple[Front, Worker]:
        if self.state.draining:
            raise WorkerStoppedError("the server is shutting down; retry on another replica")
        if self.state.front is None or self.state.worker is None:
            raise NotReadyError("the model is still loading; retry shortly")
        return self.state.front, self.state.worker

    async def _parsed(self, request: Any) -> Any:
        """The request itself; a large body (`Deferred`) checked and parsed off the loop."""
        if not isinstance(request, Deferred):
            return request
        return await self.state.planning.run(len(request.data), self._parse, request)

    def _parse(self, request: Deferred) -> Any:
        descriptor = request.message_type.DESCRIPTOR
        limits = Limits.of(self.state.settings)
        wire.check(request.data, descriptor, limits, batch="requests" in descriptor.fields_by_name)
        try:
            return request.parse()
        except Exception as exc:  # protobuf's DecodeError, and whatever else a parser raises
            self.state.metrics.undecodable.inc()
            current_call().fields["error_detail"] = type(exc).__name__
            raise InvalidArgument("request", UNDECODABLE_MESSAGE) from exc

    async def _run_planning(self, request: Message, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args), the planning of `request`, where the planning rule puts its bytes: the
        gRPC caller's own, or the request an HTTP body became."""
        with tracing.stage(current_call(), "plan"):  # every use plans (validates, tokenizes)
            return await self.state.planning.run(request.ByteSize(), fn, *args)

    def _check_chars(self, text: str, name: str, *, splittable: bool = True) -> None:
        settings = self.state.settings
        if len(text) > settings.max_text_chars and not (
            splittable and settings.long_text == "split"
        ):
            raise InvalidArgument(
                name,
                f"{len(text)} characters exceed the limit of {settings.max_text_chars} "
                "(MODERATION_MAX_TEXT_CHARS)",
            )

    def _plan(self, front: Front, request: pb.ClassifyRequest) -> PlannedItem:
        self._check_chars(request.text, "text")
        self._check_chars(request.prompt, "prompt")
        self._check_messages(request.messages, last_splittable=True)
        return front.planner.plan(convert.classify_item(request))

    def _plan_batch(self, front: Front, request: pb.ClassifyBatchRequest) -> list[PlannedItem]:
        planned = []
        for i, item in enumerate(request.requests):
            try:
                planned.append(self._plan(front, item))
            except InvalidArgument as exc:
                raise exc.nested(f"requests[{i}]") from exc
        return planned

    def _record(self, results: list[Classification], texts: list[str]) -> None:
        call = current_call()
        for r in results:
            self.state.metrics.record_decision(r)
        tokens = sum(r.prompt_tokens for r in results)
        self.state.metrics.tokens.labels(kind="prompt").inc(tokens)
        call.fields["prompt_tokens"] = tokens
        if len(results) == 1:
            call.fields.update(category=results[0].category, flagged=results[0].flagged)
        else:
            call.fields["items"] = len(results)
        if self.state.settings.log_text:
            logged = [_logged(t) for t in texts]
            call.fields["text"] = logged[0] if len(logged) == 1 else logged

    def _record_generation(self, call: CallRecord, result: GenerationResult) -> None:
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
                m.record_decision(mod)
                call.fields["category"] = mod.category

    def _check_messages(self, messages: Sequence[pb.ChatMessage], *, last_splittable: bool) -> None:
        """A conversation's size against the limits: how many messages, and each one's length
        (the last one of a conversation to classify may be split, as a text)."""
        limit = self.state.settings.max_messages
        if len(messages) > limit:
            raise InvalidArgument(
                "messages",
                f"{len(messages)} messages exceed the limit of {limit} (MODERATION_MAX_MESSAGES)",
            )
        for i, m in enumerate(messages):
            splittable = last_splittable and i == len(messages) - 1
            self._check_chars(m.content, f"messages[{i}].content", splittable=splittable)

    def _check_generation(self, request: convert.GenerateMessage) -> None:
        """Every text field against its limit, before anything reads the texts."""
        self._check_messages(request.messages, last_splittable=False)
        self._check_chars(request.system_prompt, "system_prompt", splittable=False)

    async def _generation(
        self,
        request: convert.GenerateMessage,
        context: grpc.aio.ServicerContext,
        *,
        stream: bool,
    ) -> AsyncGenerator[str | GenerationResult, None]:
        front, worker = self._ready()
        self._check_generation(request)
        options = convert.generate_options(request, self.state.settings.max_new_tokens)
        prep = await self._run_planning(
            request, front.planner.prepare, convert.chat_messages(request.messages), options
        )
        if self.state.settings.log_text:
            current_call().fields["text"] = _logged(prep.user_prompt)
        events = worker.generate(prep, stream=stream, deadline=_deadline(context))
        async with contextlib.aclosing(events):
            async for event in events:
                yield event

    # ------------------------------------- ModerateStream's host (moderate_stream.StreamHost)

    @property
    def settings(self) -> ServeSettings:
        return self.state.settings

    @property
    def open_checks(self) -> int:
        return self.state.open_checks

    @open_checks.setter
    def open_checks(self, value: int) -> None:
        self.state.open_checks = value

    def ready(self) -> tuple[Front, Worker]:
        return self._ready()

    @property
    def planning(self) -> PlanningThreads:
        return self.state.planning

    def check_open(self, request: pb.ModerateStreamOpen) -> None:
        """The sizes of a ModerateStream's context, before anything reads it."""
        try:
            self._check_chars(request.prompt, "prompt", splittable=False)
            self._check_messages(request.messages, last_splittable=False)
        except InvalidArgument as exc:
            raise exc.nested("open") from exc

    # ------------------------------------------------------------------- RPCs

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        front, worker = self._ready()
        request = await self._parsed(request)
        planned = await self._run_planning(request, self._plan, front, request)
        result = (await worker.classify([planned], deadline=_deadline(context)))[0]
        self._record([result], [_classified_text(request)])
        return convert.classify_response(result)

    async def ClassifyBatch(
        self, request: pb.ClassifyBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyBatchResponse:
        front, worker = self._ready()
        request = await self._parsed(request)
        limit = self.state.settings.max_batch_items
        if not request.requests:
            raise InvalidArgument("requests", "must not be empty")
        if len(request.requests) > limit:
            raise InvalidArgument(
                "requests",
                f"{len(request.requests)} items exceed the limit of {limit} "
                "(MODERATION_MAX_BATCH_ITEMS)",
            )
        planned = await self._run_planning(request, self._plan_batch, front, request)
        results = await worker.classify(planned, deadline=_deadline(context))
        self._record(results, [_classified_text(r) for r in request.requests])
        return pb.ClassifyBatchResponse(results=[convert.classify_response(r) for r in results])

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        request = await self._parsed(request)
        events = self._generation(request, context, stream=False)
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, GenerationResult):
                    self._record_generation(current_call(), event)
                    return convert.generate_response(event)
        raise RuntimeError("generation ended without a result")

    async def GenerateStream(
        self, request: pb.GenerateStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        request = await self._parsed(request)
        events = self._generation(request, context, stream=True)
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, str):
                    yield pb.GenerateStreamResponse(delta=event)
                    continue
                self._record_generation(current_call(), event)
                yield pb.GenerateStreamResponse(final=convert.generate_response(event))

    async def ModerateStream(
        self,
        request_iterator: AsyncIterator[pb.ModerateStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModerateStreamResponse]:
        call = current_call()
        stream = moderate_stream(self, request_iterator, _deadline(context))
        async with contextlib.aclosing(stream):
            async for response in stream:
                call.fields.update(
                    checked_tokens=response.checked_tokens,
                    category=response.result.category,
                    flagged=response.result.flagged,
                )
                if response.complete or response.result.flagged:
                    self.state.metrics.record_decision(convert.classification(response.result))
                    self.state.metrics.tokens.labels(kind="prompt").inc(
                        response.result.prompt_tokens
                    )
                yield response

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        front, _ = self._ready()
        planner, model = front.planner, front.model
        limits = model.limits
        return pb.GetModelInfoResponse(
            model=model.model_id,
            demo=model.demo,
            dtype=model.dtype,
            device=model.device,
            attention_backend=limits.attention_backend,
            sliding_window=limits.window,
            max_context_tokens=limits.context,
            default_policy=planner.default_policy,
            policies=convert.policy_info(
                list(planner.policies.values()), planner.live_thresholds()
            ),
            default_threshold=planner.threshold,
            cpu_gemm=limits.cpu_gemm,
            cpu_gemm_measure_seconds=limits.cpu_gemm_measure_seconds,
            generation_slots=limits.generation_slots,
            scoring_slots=limits.scoring_slots,
            kv_cache_bytes=limits.kv_cache_bytes,
            stream_check_tokens=self.state.settings.stream_check_tokens,
            max_stream_checks=self.state.settings.max_stream_checks,
            stream_max_answer_chars=self.state.settings.stream_max_answer_chars,
            decode_graphs=bool(limits.graph_batch_sizes),
            decode_graph_batch_sizes=list(limits.graph_batch_sizes),
            graph_capture_seconds=limits.graph_capture_seconds,
        )
