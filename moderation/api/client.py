"""A light, typed client of the moderation service.

Imports grpc, protobuf and the generated `moderation.v1` stubs, nothing else of the project (no
torch, no engine, not even the domain core), so `pip install mistral-moderation` is enough to
call a server:

    with ModerationClient("localhost:50051", token=os.environ["TOKEN"]) as client:
        result = client.classify("How do I pick a lock?")
        print(result.category, result.flagged, dict(result.scores))

Calls refused with UNAVAILABLE (a server loading, draining or restarting) or RESOURCE_EXHAUSTED
(a full queue) are retried with exponential backoff and jitter, all within the call's deadline:
`timeout` is the budget of the whole call, retries included, not of each attempt (as gRPC's own
retries count it). Every other status is raised at once as a `ModerationError`, which names the
offending field of an INVALID_ARGUMENT (the server's `google.rpc.BadRequest`).
"""

from __future__ import annotations

import itertools
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2

from moderation.v1 import moderation_pb2 as pb
from moderation.v1 import moderation_pb2_grpc as pb_grpc

__all__ = [
    "DEFAULT_TIMEOUT",
    "RETRYABLE",
    "Message",
    "ModerationClient",
    "ModerationError",
    "RoleName",
    "classify_request",
]

DEFAULT_TIMEOUT = 30.0
"""Seconds a call may take, retries included, when neither the call nor the client says."""

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
"""What a retry can cure: a server not ready (yet) or one whose queue is full right now."""

REQUEST_ID_KEY = "x-request-id"
_TOO_LARGE = "larger than max"  # gRPC's words for a message over the receiver's size limit
_STATUS_DETAILS_KEY = "grpc-status-details-bin"

RoleName = Literal["input", "output"]
Message = pb.ChatMessage | Mapping[str, str]
"""A chat message: a `ChatMessage`, or a mapping with "role" and "content" (OpenAI's shape)."""

_ROLES: dict[str, pb.Role] = {"input": pb.ROLE_INPUT, "output": pb.ROLE_OUTPUT}

T = TypeVar("T")


class ModerationError(Exception):
    """A call that failed: its gRPC status code, the server's message, the request field it
    names (INVALID_ARGUMENT), the request id the server logged it under, and the attempts made
    (more than one when retries did not cure it)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        *,
        field: str | None = None,
        request_id: str | None = None,
        attempts: int = 1,
    ):
        self.code = code
        self.details = details
        self.field = field
        self.request_id = request_id
        self.attempts = attempts
        super().__init__(f"{code.name}: {details}")

    @property
    def retryable(self) -> bool:
        # A message over the server's size limit is refused with RESOURCE_EXHAUSTED too, but
        # the same request always will be: that one is not worth a retry.
        return self.code in RETRYABLE and _TOO_LARGE not in self.details

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError, attempts: int = 1) -> ModerationError:
        code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = (err.details() if isinstance(err, grpc.Call) else None) or str(err)
        trailing = err.trailing_metadata() if isinstance(err, grpc.Call) else None
        request_id, field = None, None
        for key, value in trailing or ():
            if key == REQUEST_ID_KEY and isinstance(value, str):
                request_id = value
            elif key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
                field = _bad_field(value)
        return cls(code, details, field=field, request_id=request_id, attempts=attempts)


def _bad_field(status_bytes: bytes) -> str | None:
    """The first field a `google.rpc.BadRequest` in a rich status names, if any."""
    status = status_pb2.Status()
    try:
        status.ParseFromString(status_bytes)
    except Exception:  # a malformed header is no reason to hide the error itself
        return None
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad) and bad.field_violations:
            return str(bad.field_violations[0].field)
    return None


def _message(m: Message) -> pb.ChatMessage:
    if isinstance(m, pb.ChatMessage):
        return m
    return pb.ChatMessage(role=m["role"], content=m["content"])


def classify_request(
    text: str = "",
    *,
    role: RoleName | None = None,
    prompt: str | None = None,
    messages: Sequence[Message] | None = None,
    policy: str | None = None,
    threshold: float | None = None,
    category_thresholds: Mapping[str, float] | None = None,
) -> pb.ClassifyRequest:
    """One ClassifyRequest: a text (role "input", the default, or "output" with the user
    `prompt` it answers), or a conversation (`messages`, whose last one is classified)."""
    if role is not None and role not in _ROLES:
        raise ValueError(f"role must be 'input' or 'output', not {role!r}")
    request = pb.ClassifyRequest(
        text=text,
        role=_ROLES[role] if role else pb.ROLE_UNSPECIFIED,
        prompt=prompt or "",
        messages=[_message(m) for m in messages or ()],
        policy=policy or "",
        category_thresholds=dict(category_thresholds or {}),
    )
    if threshold is not None:
        request.threshold = threshold
    return request


def generate_request(
    messages: Sequence[Message],
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    guardrail: bool = True,
    system_prompt: str | None = None,
    moderate_input: bool = False,
    moderate_output: bool = False,
    policy: str | None = None,
    threshold: float | None = None,
    stream_check_tokens: int | None = None,
) -> pb.GenerateRequest:
    """One GenerateRequest (GenerateStream takes the same message: `stream_request`); unset
    options are left out so that the server's defaults apply."""
    fields: dict[str, Any] = {
        "messages": [_message(m) for m in messages],
        "max_new_tokens": max_new_tokens or 0,
        "temperature": temperature or 0.0,
        "top_p": top_p or 0.0,
        "disable_guardrail": not guardrail,
        "moderate_input": moderate_input,
        "moderate_output": moderate_output,
        "policy": policy or "",
        "stream_check_tokens": stream_check_tokens or 0,
    }
    for name, value in (("seed", seed), ("system_prompt", system_prompt), ("threshold", threshold)):
        if value is not None:
            fields[name] = value
    return pb.GenerateRequest(**fields)


def stream_request(request: pb.GenerateRequest) -> pb.GenerateStreamRequest:
    """The same request for GenerateStream (the two messages are the same on the wire)."""
    return pb.GenerateStreamRequest.FromString(request.SerializeToString())


def _credentials(
    tls: bool | str | os.PathLike[str] | bytes | grpc.ChannelCredentials,
) -> grpc.ChannelCredentials | None:
    if isinstance(tls, grpc.ChannelCredentials):
        return tls  # e.g. with a client certificate (mutual TLS)
    if tls is True:
        return grpc.ssl_channel_credentials()  # the system's root certificates
    if tls is False:
        return None
    if isinstance(tls, bytes):
        return grpc.ssl_channel_credentials(root_certificates=tls)
    with open(tls, "rb") as f:  # a CA bundle file
        return grpc.ssl_channel_credentials(root_certificates=f.read())


class ModerationClient:
    """A client of `moderation.v1.ModerationService` on one server or several.

    `target`: "host:port", "dns:///name:port" (round-robin over every address the name resolves
    to), or a sequence of them (each attempt of a call goes to the next one). `token`: sent as
    `authorization: Bearer <token>`. `tls`: False (plaintext), True (the system's root
    certificates), a CA file path or its PEM bytes, or ready `grpc.ChannelCredentials`.
    `timeout`: the default deadline of a call in seconds (None: none). `retries`: how many
    times a call refused with UNAVAILABLE or RESOURCE_EXHAUSTED is tried again, the first after
    about `backoff` seconds, each delay doubled up to `max_backoff`, with jitter.
    `on_retry(error, attempt, delay)` is told of each retry (to log it).

    Thread-safe: one client may serve many threads. Close it (or use it as a context manager).
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        token: str | None = None,
        tls: bool | str | os.PathLike[str] | bytes | grpc.ChannelCredentials = False,
        timeout: float | None = DEFAULT_TIMEOUT,
        retries: int = 4,
        backoff: float = 0.2,
        max_backoff: float = 10.0,
        on_retry: Callable[[ModerationError, int, float], None] | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
    ):
        targets = (target,) if isinstance(target, str) else tuple(target)
        if not targets:
            raise ValueError("ModerationClient needs at least one target")
        if retries < 0 or backoff < 0 or max_backoff < 0:
            raise ValueError("retries, backoff and max_backoff must not be negative")
        self.targets = targets
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.on_retry = on_retry
        credentials = _credentials(tls)
        options = [("grpc.lb_policy_name", "round_robin"), *channel_options]
        self._channels = [
            grpc.secure_channel(t, credentials, options=options)
            if credentials is not None
            else grpc.insecure_channel(t, options=options)
            for t in targets
        ]
        self._stubs = [pb_grpc.ModerationServiceStub(c) for c in self._channels]
        self._next_stub = itertools.cycle(self._stubs)
        self._lock = threading.Lock()
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )

    # -- the service's methods -----------------------------------------------------------------

    def classify(
        self,
        text: str | pb.ClassifyRequest = "",
        *,
        role: RoleName | None = None,
        prompt: str | None = None,
        messages: Sequence[Message] | None = None,
        policy: str | None = None,
        threshold: float | None = None,
        category_thresholds: Mapping[str, float] | None = None,
        timeout: float | None = None,
    ) -> pb.ClassifyResponse:
        """Classify a text (or a conversation: `messages`) with a policy; a ready
        ClassifyRequest may be given instead of the text and options."""
        if isinstance(text, pb.ClassifyRequest):
            request = text
        else:
            request = classify_request(
                text,
                role=role,
                prompt=prompt,
                messages=messages,
                policy=policy,
                threshold=threshold,
                category_thresholds=category_thresholds,
            )
        return self._unary(lambda s: s.Classify, request, timeout)

    def classify_batch(
        self, items: Sequence[str | pb.ClassifyRequest], *, timeout: float | None = None
    ) -> list[pb.ClassifyResponse]:
        """Many classifications in one call, answered in order. Items are texts (input role,
        the default policy) or ClassifyRequests (`classify_request(...)` builds them). One
        invalid item fails the call with INVALID_ARGUMENT naming it (`requests[i]....`)."""
        request = pb.ClassifyBatchRequest(
            requests=[
                i if isinstance(i, pb.ClassifyRequest) else pb.ClassifyRequest(text=i)
                for i in items
            ]
        )
        return list(self._unary(lambda s: s.ClassifyBatch, request, timeout).results)

    def generate(
        self,
        messages: Sequence[Message] | pb.GenerateRequest,
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        guardrail: bool = True,
        system_prompt: str | None = None,
        moderate_input: bool = False,
        moderate_output: bool = False,
        policy: str | None = None,
        threshold: float | None = None,
        stream_check_tokens: int | None = None,
        timeout: float | None = None,
    ) -> pb.GenerateResponse:
        """Guarded chat generation: the whole answer, or the refusal with its moderation.
        Unset options take the server's defaults."""
        if isinstance(messages, pb.GenerateRequest):
            request = messages
        else:
            request = generate_request(
                messages,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                guardrail=guardrail,
                system_prompt=system_prompt,
                moderate_input=moderate_input,
                moderate_output=moderate_output,
                policy=policy,
                threshold=threshold,
                stream_check_tokens=stream_check_tokens,
            )
        return self._unary(lambda s: s.Generate, request, timeout)

    def stream(
        self,
        messages: Sequence[Message] | pb.GenerateStreamRequest,
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        guardrail: bool = True,
        system_prompt: str | None = None,
        moderate_input: bool = False,
        moderate_output: bool = False,
        policy: str | None = None,
        threshold: float | None = None,
        stream_check_tokens: int | None = None,
        timeout: float | None = None,
    ) -> Iterator[pb.GenerateStreamResponse]:
        """Guarded generation as events: text `delta`s, then one `final` GenerateResponse. The
        call starts when iteration does. It is retried only until the first event arrives (a
        retry after that would repeat text the caller already has); breaking off the
        iteration (or closing the iterator) cancels the call."""
        if isinstance(messages, pb.GenerateStreamRequest):
            request = messages
        else:
            request = stream_request(
                generate_request(
                    messages,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    seed=seed,
                    guardrail=guardrail,
                    system_prompt=system_prompt,
                    moderate_input=moderate_input,
                    moderate_output=moderate_output,
                    policy=policy,
                    threshold=threshold,
                    stream_check_tokens=stream_check_tokens,
                )
            )
        return self._stream(request, timeout)

    def moderate_stream(
        self,
        deltas: Iterable[str | bytes],
        *,
        prompt: str | None = None,
        messages: Sequence[Message] | None = None,
        policy: str | None = None,
        threshold: float | None = None,
        category_thresholds: Mapping[str, float] | None = None,
        check_tokens: int | None = None,
        timeout: float | None = None,
    ) -> Iterator[pb.ModerateStreamResponse]:
        """Check an answer another LLM is writing, as it is written (ModerateStream).

        `deltas`: the answer's text pieces as the LLM produces them (read as they come, on
        gRPC's thread), `str`, or UTF-8 `bytes` that may end inside a character; `prompt`
        (the user prompt) or `messages` (the conversation so far) is what it replies to.
        Yields a verdict every `check_tokens` tokens (None = the server's default) with
        `released_chars`, how much of the text may be shown; the last one is flagged or
        `complete` (the verdict on the whole answer). Not retried: the deltas are consumed as
        they are sent. `timeout` bounds the whole call (None: no deadline, the server's idle
        limit bounds a silent caller); breaking off the iteration cancels it."""
        opened = pb.ModerateStreamOpen(
            policy=policy or "",
            prompt=prompt or "",
            messages=[_message(m) for m in messages or ()],
            category_thresholds=dict(category_thresholds or {}),
            check_tokens=check_tokens or 0,
        )
        if threshold is not None:
            opened.threshold = threshold

        def requests() -> Iterator[pb.ModerateStreamRequest]:
            yield pb.ModerateStreamRequest(open=opened)
            for delta in deltas:
                if isinstance(delta, bytes):
                    if delta:
                        yield pb.ModerateStreamRequest(delta_bytes=delta)
                elif delta:
                    yield pb.ModerateStreamRequest(delta=delta)
            yield pb.ModerateStreamRequest(done=True)

        call = self._stub().ModerateStream(requests(), timeout=timeout, metadata=self._metadata)
        try:
            yield from call
        except grpc.RpcError as err:
            raise ModerationError.from_rpc_error(err) from err
        finally:
            call.cancel()  # no-op when finished; frees the server's check when the caller left

    def get_model_info(self, *, timeout: float | None = None) -> pb.GetModelInfoResponse:
        """The served model, its limits, and the policies the server knows."""
        return self._unary(lambda s: s.GetModelInfo, pb.GetModelInfoRequest(), timeout)

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> ModerationClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- retries and deadlines -----------------------------------------------------------------

    def _stub(self) -> pb_grpc.ModerationServiceStub:
        with self._lock:
            return next(self._next_stub)

    def _deadline(self, timeout: float | None) -> float | None:
        budget = self.timeout if timeout is None else timeout
        return None if budget is None else time.monotonic() + budget

    def _after_failure(self, err: grpc.RpcError, attempt: int, deadline: float | None) -> None:
        """Sleep before the next attempt, or raise the error when it is final: not retryable,
        out of retries, or no time left in the call's deadline for another attempt."""
        error = ModerationError.from_rpc_error(err, attempts=attempt + 1)
        if not error.retryable or attempt >= self.retries:
            raise error from err
        delay = min(self.backoff * 2**attempt, self.max_backoff)
        delay *= 0.5 + random.random()  # jitter: clients refused together do not retry together
        if deadline is not None and time.monotonic() + delay >= deadline:
            raise ModerationError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"deadline exceeded after {attempt + 1} attempts; last: {error}",
                request_id=error.request_id,
                attempts=attempt + 1,
            ) from err
        if self.on_retry is not None:
            self.on_retry(error, attempt + 1, delay)
        time.sleep(delay)

    def _remaining(self, deadline: float | None) -> float | None:
        return None if deadline is None else max(deadline - time.monotonic(), 0.0)

    def _unary(
        self,
        method: Callable[[pb_grpc.ModerationServiceStub], Callable[..., T]],
        request: Any,
        timeout: float | None,
    ) -> T:
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            try:
                return method(self._stub())(
                    request, timeout=self._remaining(deadline), metadata=self._metadata
                )
            except grpc.RpcError as err:
                self._after_failure(err, attempt, deadline)
            attempt += 1

    def _stream(
        self, request: pb.GenerateStreamRequest, timeout: float | None
    ) -> Iterator[pb.GenerateStreamResponse]:
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            call = self._stub().GenerateStream(
                request, timeout=self._remaining(deadline), metadata=self._metadata
            )
            try:
                first = next(call)
            except StopIteration:
                return
            except grpc.RpcError as err:
                self._after_failure(err, attempt, deadline)
                attempt += 1
                continue
            break
        try:
            yield first
            yield from call
        except grpc.RpcError as err:
            raise ModerationError.from_rpc_error(err, attempts=attempt + 1) from err
        finally:
            call.cancel()  # no-op when finished; stops the generation when the caller left
