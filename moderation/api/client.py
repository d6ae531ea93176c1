"""A light client of running servers: many ClassifyItems scored over gRPC, spread over the
targets, retried, one bad item never failing the others. No torch in its import graph."""

from __future__ import annotations

import concurrent.futures
import itertools
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from moderation.api import convert
from moderation.core.decision import Classification, ClassifyItem
from moderation.core.errors import InvalidArgument
from moderation.core.policy import Policy
from moderation.v1 import moderation_pb2 as pb
from moderation.v1 import moderation_pb2_grpc as pb_grpc

Outcome = Classification | str  # a result, or the reason the item could not be scored

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


class RemoteError(Exception):
    """The servers could not be reached, even after retries."""


@dataclass(frozen=True)
class RemoteOptions:
    targets: tuple[str, ...]
    concurrency: int = 8  # requests in flight
    chunk: int = 16  # items per ClassifyBatch call
    token: str | None = None
    tls_ca: str | None = None
    retries: int = 8
    backoff: float = 0.2  # first retry delay in seconds, doubled each time (with jitter)
    timeout: float = 120.0


class RemoteScorer:
    """ClassifyBatch calls spread over the targets, N in flight, retried on UNAVAILABLE and
    RESOURCE_EXHAUSTED with exponential backoff. A `dns:///name` target uses gRPC's
    round_robin over every address the name resolves to."""

    def __init__(self, options: RemoteOptions):
        self.options = options
        creds = None
        if options.tls_ca:
            with open(options.tls_ca, "rb") as f:
                creds = grpc.ssl_channel_credentials(f.read())
        channel_options = [("grpc.lb_policy_name", "round_robin")]
        self._channels = [
            grpc.secure_channel(t, creds, options=channel_options)
            if creds
            else grpc.insecure_channel(t, options=channel_options)
            for t in options.targets
        ]
        self._stubs = [pb_grpc.ModerationServiceStub(c) for c in self._channels]
        self._next = itertools.cycle(range(len(self._stubs)))
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(options.concurrency)
        self._metadata = (("authorization", f"Bearer {options.token}"),) if options.token else ()
        self._policies: dict[str, Policy] = {}

    def _stub(self) -> pb_grpc.ModerationServiceStub:
        with self._lock:
            return self._stubs[next(self._next)]

    def _call(self, method: str, request: object) -> object:
        delay = self.options.backoff
        for attempt in range(self.options.retries + 1):
            try:
                return getattr(self._stub(), method)(
                    request, timeout=self.options.timeout, metadata=self._metadata
                )
            except grpc.RpcError as err:
                code = err.code()  # type: ignore[attr-defined]
                if code not in RETRYABLE or attempt == self.options.retries:
                    raise
                time.sleep(delay * (0.5 + random.random()))  # jitter: retries do not align
                delay = min(delay * 2, 10.0)
        raise AssertionError("unreachable")

    def policy(self, name: str | None) -> Policy:
        key = name or ""
        if key not in self._policies:
            try:
                info = self._call("GetModelInfo", pb.GetModelInfoRequest())
            except grpc.RpcError as err:
                raise RemoteError(
                    f"cannot reach {', '.join(self.options.targets)}: {err.details()}"
                ) from err  # type: ignore[attr-defined]
            assert isinstance(info, pb.GetModelInfoResponse)
            wanted = name or info.default_policy
            for p in info.policies:
                if p.name == wanted:
                    self._policies[key] = convert.policy_from_info(p)
                    break
            else:
                known = ", ".join(p.name for p in info.policies)
                raise InvalidArgument(
                    "policy", f"unknown policy {wanted!r}; the server knows: {known}"
                )
        return self._policies[key]

    def score(self, items: Sequence[ClassifyItem]) -> list[Outcome]:
        chunks = [
            list(items[i : i + self.options.chunk])
            for i in range(0, len(items), self.options.chunk)
        ]
        out: list[Outcome] = []
        for part in self._pool.map(self._score_chunk, chunks):
            out.extend(part)
        return out

    def _score_chunk(self, items: list[ClassifyItem]) -> list[Outcome]:
        request = pb.ClassifyBatchRequest(requests=[convert.classify_request(i) for i in items])
        try:
            response = self._call("ClassifyBatch", request)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.INVALID_ARGUMENT:  # type: ignore[attr-defined]
                raise RemoteError(
                    f"ClassifyBatch failed: {err.code().name}: {err.details()}"
                ) from err  # type: ignore[attr-defined]
            # One bad item fails the whole batch call: score them one by one to find it.
            return [self._score_one(i) for i in items]
        assert isinstance(response, pb.ClassifyBatchResponse)
        return [convert.classification(r) for r in response.results]

    def _score_one(self, item: ClassifyItem) -> Outcome:
        try:
            response = self._call("Classify", convert.classify_request(item))
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.INVALID_ARGUMENT:  # type: ignore[attr-defined]
                return str(err.details())  # type: ignore[attr-defined]
            raise RemoteError(f"Classify failed: {err.code().name}: {err.details()}") from err  # type: ignore[attr-defined]
        assert isinstance(response, pb.ClassifyResponse)
        return convert.classification(response)

    def close(self) -> None:
        self._pool.shutdown()
        for c in self._channels:
            c.close()
