"""What makes the server safe on a cluster network: bearer-token auth (health and reflection
stay open for probes and tooling), TLS and mutual TLS. Real servers on loopback ports."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from moderation.serving.settings import ServeSettings
from moderation.v1 import moderation_pb2 as pb
from moderation.v1 import moderation_pb2_grpc as pb_grpc
from tests.certs import NoCertificateTool, make_certificates
from tests.servers import SERVING, InProcessServer, demo_loader, free_port, health_status

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def authed(demo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    token_file = tmp_path_factory.mktemp("auth") / "token"
    token_file.write_text(f"{TOKEN}\n")  # a trailing newline, as `kubectl create secret` leaves
    settings = ServeSettings(
        model_process=False,
        host="127.0.0.1",
        port=free_port(),
        metrics_port=0,
        auth_token_file=str(token_file),
    )
    server = InProcessServer(settings, demo_loader(demo_checkpoint))
    server.wait_loaded()
    yield server
    server.stop()


def test_calls_without_the_right_token_are_unauthenticated(authed: InProcessServer) -> None:
    stub = pb_grpc.ModerationServiceStub(grpc.insecure_channel(authed.address))
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(pb.ClassifyRequest(text="x"), metadata=metadata, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "bearer token" in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as stream_err:
        list(stub.GenerateStream(pb.GenerateStreamRequest(), timeout=10))
    assert stream_err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Refusals are requests too: counted by method and status (once each call is over on the
    # server, which may be just after the client saw the error).
    deadline = time.monotonic() + 5
    while unauthenticated(authed) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert unauthenticated(authed) == 3


def unauthenticated(server: InProcessServer) -> float:
    labels = {
        "grpc_type": "unary",
        "grpc_service": "moderation.v1.ModerationService",
        "grpc_method": "Classify",
        "grpc_code": "Unauthenticated",
    }
    value = server.server.metrics.registry.get_sample_value("grpc_server_handled_total", labels)
    return value or 0.0


def test_the_right_token_is_let_through(authed: InProcessServer) -> None:
    stub = pb_grpc.ModerationServiceStub(grpc.insecure_channel(authed.address))
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    assert stub.Classify(pb.ClassifyRequest(text="x"), metadata=metadata, timeout=30).model
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata, timeout=10)
    assert info.demo


def test_health_and_reflection_need_no_token(authed: InProcessServer) -> None:
    channel = grpc.insecure_channel(authed.address)
    assert health_status(channel) == SERVING
    assert health_status(channel, "moderation.v1.ModerationService") == SERVING
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"moderation.v1.ModerationService", "grpc.health.v1.Health"} <= services


def test_reflection_describes_the_service(authed: InProcessServer) -> None:
    db = ProtoReflectionDescriptorDatabase(grpc.insecure_channel(authed.address))
    proto = db.FindFileContainingSymbol("moderation.v1.ModerationService")
    methods = {m.name for s in proto.service for m in s.method}
    assert methods == {
        "Classify",
        "ClassifyBatch",
        "Generate",
        "GenerateStream",
        "ModerateStream",
        "GetModelInfo",
    }


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    try:
        return make_certificates(tmp_path_factory.mktemp("certs"))
    except NoCertificateTool as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_tls_and_mutual_tls(
    demo_checkpoint: Path, certificates: dict[str, Path], mutual: bool
) -> None:
    c = certificates
    settings = ServeSettings(model_process=False,
        host="127.0.0.1", port=free_port(), metrics_port=0, tls_cert=str(c["srv.pem"]),
        tls_key=str(c["srv.key"]), tls_client_ca=str(c["ca.pem"]) if mutual else None,
    )  # fmt: skip
    server = InProcessServer(settings, demo_loader(demo_checkpoint))
    server.wait_loaded()
    try:
        ca = c["ca.pem"].read_bytes()
        client_pair = {
            "private_key": c["cli.key"].read_bytes(),
            "certificate_chain": c["cli.pem"].read_bytes(),
        }
        creds = grpc.ssl_channel_credentials(ca, **(client_pair if mutual else {}))
        secure = grpc.secure_channel(server.address, creds)
        stub = pb_grpc.ModerationServiceStub(secure)
        assert stub.Classify(pb.ClassifyRequest(text="over tls"), timeout=30).model
        assert health_status(secure) == SERVING
        plain = pb_grpc.ModerationServiceStub(grpc.insecure_channel(server.address))
        with pytest.raises(grpc.RpcError) as err:  # no plaintext on a TLS port
            plain.Classify(pb.ClassifyRequest(text="x"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        if mutual:  # a client without a certificate signed by the CA is refused
            anonymous = grpc.secure_channel(server.address, grpc.ssl_channel_credentials(ca))
            with pytest.raises(grpc.RpcError) as anon_err:
                pb_grpc.ModerationServiceStub(anonymous).Classify(
                    pb.ClassifyRequest(text="x"), timeout=5
                )
            assert anon_err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()
