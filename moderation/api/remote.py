"""Remote scoring for the jobs: many ClassifyItems scored over gRPC by running servers, N calls
in flight, spread over the targets and retried by a `ModerationClient`, one bad item never
failing the others. No torch in its import graph."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from moderation.api import convert
from moderation.api.client import ModerationClient, ModerationError
from moderation.core.decision import Classification, ClassifyItem
from moderation.core.errors import InvalidArgument
from moderation.core.policy import Policy

Outcome = Classification | str  # a result, or the reason the item could not be scored


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
    timeout: float = 120.0  # per call, retries included


class RemoteScorer:
    """ClassifyBatch calls spread over the targets, N in flight, retried on UNAVAILABLE and
    RESOURCE_EXHAUSTED with exponential backoff (each attempt on the next target). A
    `dns:///name` target uses gRPC's round_robin over every address the name resolves to."""

    def __init__(self, options: RemoteOptions):
        self.options = options
        self.client = ModerationClient(
            options.targets,
            token=options.token,
            tls=options.tls_ca or False,
            timeout=options.timeout,
            retries=options.retries,
            backoff=options.backoff,
        )
        self._pool = concurrent.futures.ThreadPoolExecutor(options.concurrency)
        self._policies: dict[str, Policy] = {}

    def policy(self, name: str | None) -> Policy:
        key = name or ""
        if key not in self._policies:
            try:
                info = self.client.get_model_info()
            except ModerationError as err:
                raise RemoteError(
                    f"cannot reach {', '.join(self.options.targets)}: {err.details}"
                ) from err
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
        try:
            results = self.client.classify_batch([convert.classify_request(i) for i in items])
        except ModerationError as err:
            if err.code != grpc.StatusCode.INVALID_ARGUMENT:
                raise RemoteError(f"ClassifyBatch failed: {err}") from err
            # One bad item fails the whole batch call: score them one by one to find it.
            return [self._score_one(i) for i in items]
        return [convert.classification(r) for r in results]

    def _score_one(self, item: ClassifyItem) -> Outcome:
        try:
            response = self.client.classify(convert.classify_request(item))
        except ModerationError as err:
            if err.code == grpc.StatusCode.INVALID_ARGUMENT:
                return err.details
            raise RemoteError(f"Classify failed: {err}") from err
        return convert.classification(response)

    def close(self) -> None:
        self._pool.shutdown()
        self.client.close()
