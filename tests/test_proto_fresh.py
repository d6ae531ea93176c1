"""The committed gRPC code in moderation/v1/ matches protos/ and exposes the five RPCs."""

from __future__ import annotations

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
RPCS = {"Classify", "ClassifyBatch", "Generate", "GenerateStream", "ModerateStream", "GetModelInfo"}


def test_generated_code_is_fresh(tmp_path: Path) -> None:
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


def test_service_has_the_six_rpcs() -> None:
    from moderation.v1 import moderation_pb2, moderation_pb2_grpc

    service = moderation_pb2.DESCRIPTOR.services_by_name["ModerationService"]
    assert {m.name for m in service.methods} == RPCS
    assert service.full_name == "moderation.v1.ModerationService"
    stream = service.methods_by_name["GenerateStream"]
    assert stream.server_streaming and not stream.client_streaming
    both = service.methods_by_name["ModerateStream"]
    assert both.server_streaming and both.client_streaming
    for name in RPCS - {"GenerateStream", "ModerateStream"}:
        method = service.methods_by_name[name]
        assert not method.server_streaming and not method.client_streaming
    # The server implements every RPC (the generated base class answers UNIMPLEMENTED).
    from moderation.serving.grpc.servicer import ModerationServicer

    base = moderation_pb2_grpc.ModerationServiceServicer
    for name in RPCS:
        assert getattr(ModerationServicer, name) is not getattr(base, name), name


def test_every_rpc_has_an_http_rule() -> None:
    """Envoy / grpc-gateway transcoding and the built-in HTTP listener read these rules. A
    stream in both directions (ModerateStream) has none: HTTP/JSON transcoding cannot carry
    it; the listener serves it as a WebSocket."""
    from google.api import annotations_pb2

    from moderation.v1 import moderation_pb2

    service = moderation_pb2.DESCRIPTOR.services_by_name["ModerationService"]
    paths = {}
    for method in service.methods:
        if method.client_streaming:
            assert not method.GetOptions().HasExtension(annotations_pb2.http), method.name
            continue
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        verb = rule.WhichOneof("pattern")
        assert verb in {"get", "post"}, f"{method.name} has no google.api.http rule"
        paths[method.name] = (verb, getattr(rule, verb))
        if verb == "post":
            assert rule.body == "*", method.name
    assert len(set(paths.values())) == len(paths), f"two RPCs share a path: {paths}"
    assert paths["Classify"] == ("post", "/v1/classify")
    assert paths["GetModelInfo"] == ("get", "/v1/model")


def test_buf_lint_standard_is_clean() -> None:
    """gRPC's conventions as buf checks them (protos/buf.yaml: STANDARD, the vendored googleapis
    files excepted). `.ci/run` installs buf from npm."""
    import shutil

    buf = shutil.which("buf")
    if buf is None:
        pytest.skip("buf is not installed (`.ci/run` installs it with npm: @bufbuild/buf)")
    result = subprocess.run(
        [buf, "lint"], cwd=ROOT / "protos", capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"buf lint findings:\n{result.stdout}{result.stderr}"
