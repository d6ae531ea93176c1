"""`moderation serve` sizes its cache from a context limit and a memory budget, so a model
without a sliding window (Mistral 7B v0.2/v0.3: a 32k context) starts with default settings."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import grpc
import torch

from model.args import ModelArgs
from model.demo import random_weights
from model.tokenizer import mistral_common_tokenizer_path
from model.weights import save_consolidated
from moderation.v1 import moderation_pb2 as pb
from moderation.v1 import moderation_pb2_grpc as pb_grpc
from tests.servers import free_port, start_subprocess_server, wait_serving

# No window and a 32k context, with the 7B's KV width per layer (8 heads x 128): 16 KiB of
# cache per token in fp32. Sized from the 32k context, the 64 slots that `serve` asks for would
# be 32 GiB, more than this machine has; at the default context limit they are 128 MiB each.
NO_WINDOW_ARGS = ModelArgs(
    dim=256, n_layers=2, head_dim=128, hidden_dim=512, n_heads=8, n_kv_heads=8, norm_eps=1e-5,
    vocab_size=32000, rope_theta=1e6, sliding_window=None, max_seq_len=32768,
)  # fmt: skip


def write_no_window_checkpoint(out: Path) -> Path:
    save_consolidated(out, NO_WINDOW_ARGS, random_weights(NO_WINDOW_ARGS))
    shutil.copyfile(mistral_common_tokenizer_path("v1"), out / "tokenizer.model")
    return out


def test_a_32k_model_without_a_window_starts_under_serve_with_default_settings(
    tmp_path: Path,
) -> None:
    folder = write_no_window_checkpoint(tmp_path / "v02-like")
    assert json.loads((folder / "params.json").read_text()).get("sliding_window") is None
    port = free_port()
    proc = start_subprocess_server(port, "--model", str(folder))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_serving(channel, timeout=180)
            stub = pb_grpc.ModerationServiceStub(channel)
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
            assert info.max_context_tokens == 8192  # the default --max-context, not 32768
            answer = stub.Classify(pb.ClassifyRequest(text="hello there"), timeout=60)
            assert abs(sum(answer.scores.values()) - 1.0) < 1e-4
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    # The start-up line says where the memory went, as a JSON log line like the others.
    memory = [
        json.loads(line) for line in out.splitlines() if line.startswith("{") and
        json.loads(line).get("event", "").startswith("engine memory")
    ]  # fmt: skip
    assert len(memory) == 1, out
    assert "x 8192 tokens x 16 KiB" in memory[0]["event"]
    assert memory[0]["logger"] == "model.engine"
    # So does the CPU kernel choice, measured at start-up (where oneDNN is present).
    gemm = [
        json.loads(line) for line in out.splitlines() if line.startswith("{") and
        json.loads(line).get("event", "").startswith("cpu gemm:")
    ]  # fmt: skip
    if torch.backends.mkldnn.is_available():
        assert len(gemm) == 1 and gemm[0]["logger"] == "model.cpu_gemm", out
        assert "wqkv" in gemm[0]["event"] and "measured in" in gemm[0]["event"]
