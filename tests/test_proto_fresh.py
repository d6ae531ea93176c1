"""The committed gRPC code in moderation/v1/ matches protos/ and exposes the five RPCs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "protos" / "generate.py"
GENERATED = (
    "moderation/v1/moderation_pb2.py",
    "moderation/v1/moderation_pb2.pyi",
    "moderation/v1/moderation_pb2_grpc.py",
)
RPCS = {"Classify", "ClassifyBatch", "Generate", "GenerateStream", "GetModelInfo"}


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools is not installed (pip install -e '.[dev]')")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"protos/generate.py failed:\n{result.stderr}"
    stale = [
        rel
        for rel in GENERATED
        if not (ROOT / rel).exists() or (ROOT / rel).read_bytes() != (tmp_path / rel).read_bytes()
    ]
    assert not stale, (
        f"generated code is stale or missing: {', '.join(stale)}; "
        "run `python protos/generate.py` and commit the result "
        "(with the grpcio-tools version pinned in pyproject's dev extra)"
    )


def test_service_has_the_five_rpcs() -> None:
    from moderation.v1 import moderation_pb2, moderation_pb2_grpc

    service = moderation_pb2.DESCRIPTOR.services_by_name["ModerationService"]
    assert {m.name for m in service.methods} == RPCS
    assert service.full_name == "moderation.v1.ModerationService"
    stream = service.methods_by_name["GenerateStream"]
    assert stream.server_streaming and not stream.client_streaming
    for name in RPCS - {"GenerateStream"}:
        method = service.methods_by_name[name]
        assert not method.server_streaming and not method.client_streaming
    servicer = moderation_pb2_grpc.ModerationServiceServicer
    assert set(vars(servicer)) >= RPCS
    assert callable(moderation_pb2_grpc.add_ModerationServiceServicer_to_server)


def test_messages_round_trip() -> None:
    from moderation.v1 import moderation_pb2 as pb

    request = pb.ClassifyRequest(
        text="hi", role=pb.ROLE_OUTPUT, prompt="q", policy="paper", threshold=0.7
    )
    request.category_thresholds["fraud"] = 0.3
    assert request.HasField("threshold")
    assert pb.ClassifyRequest.FromString(request.SerializeToString()) == request
    final = pb.GenerateStreamResponse(
        final=pb.GenerateResponse(text="x", finish_reason=pb.FINISH_REASON_STOP)
    )
    assert final.WhichOneof("event") == "final"
    assert pb.GenerateRequest(seed=0).HasField("seed")  # optional: 0 differs from unset
