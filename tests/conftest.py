"""Shared fixtures: the demo checkpoint and a runtime loaded from it (the real engine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.demo import write_demo_checkpoint


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight demo checkpoint (consolidated layout, real v1 tokenizer)."""
    return write_demo_checkpoint(tmp_path_factory.mktemp("demo-model"))


@pytest.fixture(scope="session")
def demo_runtime(demo_checkpoint: Path):  # type: ignore[no-untyped-def]
    """Engine, tokenizer, classifier and generator on the demo checkpoint, shared by tests
    that only read from it (the engine itself is not thread-safe)."""
    from moderation.runtime import load_runtime

    return load_runtime(demo_checkpoint, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def stub(served):  # type: ignore[no-untyped-def]
    """A gRPC stub on the module's own `served` server (each server test module defines one)."""
    import grpc

    from moderation.v1 import moderation_pb2_grpc as pb_grpc

    return pb_grpc.ModerationServiceStub(grpc.insecure_channel(served.address))
