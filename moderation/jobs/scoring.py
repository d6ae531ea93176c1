"""Scoring many texts for the jobs: in-process through the engine, or remote over gRPC.

Both take ClassifyItems and give back, per item and in order, a Classification or an error
message for that item; one bad item never fails the others.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from moderation.api.remote import Outcome, RemoteOptions, RemoteScorer
from moderation.core.decision import ClassifyItem
from moderation.core.errors import InvalidArgument
from moderation.core.policy import Policy
from moderation.extras import require_server_extra

if TYPE_CHECKING:
    from moderation.runtime import Runtime


class Scorer(Protocol):
    def policy(self, name: str | None) -> Policy:
        """The policy a name resolves to (its categories name the output columns)."""
        ...

    def score(self, items: Sequence[ClassifyItem]) -> list[Outcome]: ...

    def close(self) -> None: ...


class LocalScorer:
    """The engine in this process: invalid items are set aside, the rest is one batched pass."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def policy(self, name: str | None) -> Policy:
        return self.runtime.classifier.policy(name)

    def score(self, items: Sequence[ClassifyItem]) -> list[Outcome]:
        classifier = self.runtime.classifier
        out: list[Outcome] = []
        planned, where = [], []
        for i, item in enumerate(items):
            try:
                planned.append(classifier.plan(item))
                where.append(i)
                out.append("")
            except InvalidArgument as exc:
                out.append(str(exc))
        for i, result in zip(where, classifier.run(planned), strict=True):
            out[i] = result
        return out

    def close(self) -> None:
        pass


def make_scorer(ns: argparse.Namespace, policy_files: Sequence[str] = ()) -> Scorer:
    """In-process (--model, or the demo) or remote (--target ...), from the jobs' options."""
    if ns.target:
        token = ns.token
        if ns.token_file:
            token = Path(ns.token_file).read_text(encoding="utf-8").strip()
        return RemoteScorer(
            RemoteOptions(
                targets=tuple(ns.target),
                concurrency=ns.concurrency,
                chunk=max(1, min(ns.batch_size, 64)),
                token=token,
                tls_ca=ns.tls_ca,
            )
        )
    # The engine only now: remote scoring runs where only the light client is installed.
    command = getattr(ns, "command", None) or "batch"
    require_server_extra(f"moderation {command} without --target")
    from moderation.runtime import load_runtime, set_torch_threads

    set_torch_threads(ns.torch_threads)
    runtime = load_runtime(
        ns.model,
        device=ns.device,
        dtype=ns.dtype,
        max_context=ns.max_context,
        policy_files=policy_files,
        long_text=ns.long_text,
    )
    return LocalScorer(runtime)
