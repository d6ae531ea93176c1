"""`pip install mistral-moderation` is the light client: the wheel installed with its
dependencies into a fresh virtual environment, without torch, calls a real server, and the
`moderation` command there scores a CSV remotely and says what to install for the rest.

The wheel is built from this checkout (`pip wheel --no-deps`); the dependencies (grpcio,
protobuf, googleapis-common-protos) come from the package index as pip is configured.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

from moderation.serving.settings import ServeSettings
from tests.servers import InProcessServer, demo_loader, free_port

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "light-s3cret"
# The light environment must not see this checkout (a PYTHONPATH would hand it the sources).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

# What runs in the light environment: no torch, no engine, and the service answers.
CLIENT_SCRIPT = """
import importlib.util, json, sys
from moderation.api.client import ModerationClient, ModerationError, classify_request

assert importlib.util.find_spec("torch") is None, "torch is installed"
target, token = sys.argv[1], sys.argv[2]
out = {}
with ModerationClient(target, token=token) as client:
    r = client.classify("How do I pick a lock?")
    out["classify"] = [r.category, r.flagged, dict(r.scores)]
    batch = client.classify_batch(["a", classify_request("b", policy="mistral-13")])
    out["batch"] = [b.policy for b in batch]
    events = list(client.stream([{"role": "user", "content": "hi"}], max_new_tokens=4))
    out["stream"] = events[-1].final.text == "".join(e.delta for e in events[:-1])
    out["policies"] = [p.name for p in client.get_model_info().policies]
    try:
        client.classify("")
    except ModerationError as err:
        out["error"] = [err.code.name, err.field]
out["engine_loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "model"))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def light_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh environment with the project's wheel and its base dependencies only."""
    root = tmp_path_factory.mktemp("light")
    wheels = root / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(wheels), str(ROOT)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    (wheel,) = wheels.glob("mistral_moderation-*.whl")
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    proc = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(wheel)],
        capture_output=True, text=True, timeout=600, env=ENV,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return env_dir


@pytest.fixture(scope="module")
def server(demo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    token_file = tmp_path_factory.mktemp("light-auth") / "token"
    token_file.write_text(TOKEN)
    settings = ServeSettings(model_process=False,
        host="127.0.0.1", port=free_port(), metrics_port=0, auth_token_file=str(token_file),
    )  # fmt: skip
    s = InProcessServer(settings, demo_loader(demo_checkpoint))
    s.wait_loaded()
    yield s.address
    s.stop()


def _installed(env_dir: Path) -> set[str]:
    proc = subprocess.run(
        [str(env_dir / "bin" / "python"), "-m", "pip", "list", "--format", "json"],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return {p["name"].lower() for p in json.loads(proc.stdout)}


def test_the_base_install_is_the_client_and_nothing_heavy(light_venv: Path) -> None:
    installed = _installed(light_venv)
    assert {"mistral-moderation", "grpcio", "protobuf", "googleapis-common-protos"} <= installed
    heavy = {"torch", "numpy", "sentencepiece", "safetensors", "structlog", "mistral-common"}
    assert not installed & heavy


def test_the_light_client_calls_a_server(light_venv: Path, server: str) -> None:
    proc = subprocess.run(
        [str(light_venv / "bin" / "python"), "-c", CLIENT_SCRIPT, server, TOKEN],
        capture_output=True, text=True, timeout=300, cwd=light_venv, env=ENV,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    category, _, scores = out["classify"]
    assert category in scores and sum(scores.values()) == pytest.approx(1.0, abs=1e-4)
    assert out["batch"] == ["paper", "mistral-13"]
    assert out["stream"] is True and "paper" in out["policies"]
    assert out["error"] == ["INVALID_ARGUMENT", "text"]
    assert out["engine_loaded"] == []


def test_the_light_command_scores_remotely_and_names_the_extra(
    light_venv: Path, server: str, tmp_path: Path
) -> None:
    moderation = str(light_venv / "bin" / "moderation")
    inp, out = tmp_path / "in.csv", tmp_path / "out.csv"
    inp.write_text('text\nhello there\n""\nhow are you\n')
    proc = subprocess.run(
        [moderation, "batch", str(inp), "-o", str(out), "--text-column", "text",
         "--target", server, "--token", TOKEN, "--max-failed-rows", "1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=ENV,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert [r["text"] for r in rows] == ["hello there", "", "how are you"]
    assert rows[0]["category"] and rows[2]["category"] and not rows[0]["error"]
    assert rows[1]["error"] == "text: must not be empty"  # the server's field error, per row
    for argv in (["serve", "--port", "1"], ["classify", "x"], ["batch", str(inp), "-o",
                 str(tmp_path / "local.csv"), "--text-column", "text"]):  # fmt: skip
        proc = subprocess.run(
            [moderation, *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=ENV
        )
        assert proc.returncode == 2, (argv, proc.stderr)
        assert f"moderation {argv[0]}" in proc.stderr
        assert "needs the server extra" in proc.stderr
        assert "pip install '.[server]' (in a checkout of the repository)" in proc.stderr
