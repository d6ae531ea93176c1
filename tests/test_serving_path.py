"""The serving path's own shortcuts keep the service's rules: a small request is planned on the
event loop (cheaper than a thread hop), a large one on the planning threads."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import grpc
import pytest

from model import Tokenizer
from moderation.serving.grpc.servicer import INLINE_PLAN_BYTES
from moderation.serving.settings import ServeSettings
from moderation.v1 import moderation_pb2 as pb
from moderation.v1 import moderation_pb2_grpc as pb_grpc
from tests.servers import InProcessServer, demo_loader, free_port


def test_small_requests_are_planned_on_the_loop_and_large_ones_on_the_planning_threads(
    demo_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    encode = Tokenizer.encode

    def recording(self: Tokenizer, *args: Any, **kwargs: Any) -> list[int]:
        threads.append(threading.current_thread().name)
        return encode(self, *args, **kwargs)

    settings = ServeSettings(
        model_process=False, host="127.0.0.1", port=free_port(), metrics_port=0
    )
    server = InProcessServer(settings, demo_loader(demo_checkpoint))
    server.wait_loaded()
    try:
        stub = pb_grpc.ModerationServiceStub(grpc.insecure_channel(server.address))
        monkeypatch.setattr(Tokenizer, "encode", recording)
        stub.Classify(pb.ClassifyRequest(text="a short text"))
        small = threads[:]
        threads.clear()
        stub.Classify(pb.ClassifyRequest(text="word " * (INLINE_PLAN_BYTES // 4)))
        large = threads[:]
    finally:
        server.stop()
    assert small and not any(t.startswith("plan") for t in small), small
    assert large and all(t.startswith("plan") for t in large), large
