"""How `make` installs torch and what `make serve` installs: the CPU build without an NVIDIA GPU
(falling back to the default index when the CPU index is unreachable), no dev tools to serve.
Nothing is downloaded: the script prints its pip command (TORCH_DRY_RUN)."""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "install-torch.sh"


def choose(tmp_path: Path, *, gpu: bool, cpu_index: str, **env: str) -> str:
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    smi = fake / "nvidia-smi"
    if gpu:
        smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n")
        smi.chmod(0o755)
    elif smi.exists():
        smi.unlink()
    run_env = {
        "PATH": f"{fake}:/usr/bin:/bin",
        "TORCH_DRY_RUN": "1",
        "TORCH_CPU_INDEX": cpu_index,
        # An ordinary machine: no pip configuration, so no local wheels (find-links).
        "PIP_CONFIG_FILE": os.devnull,
        **env,
    }
    proc = subprocess.run(
        ["sh", str(SCRIPT), sys.executable, "2.13.0"],
        capture_output=True, text=True, env=run_env, timeout=60, check=True,
    )  # fmt: skip
    return proc.stdout.strip()


@pytest.fixture
def cpu_index(tmp_path: Path) -> Iterator[str]:
    """A reachable stand-in for download.pytorch.org/whl/cpu (it has a torch/ page)."""
    root = tmp_path / "index"
    (root / "torch").mkdir(parents=True)
    (root / "torch" / "index.html").write_text("<html></html>")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: object, **kw: object) -> None:
            super().__init__(*a, directory=str(root), **kw)  # type: ignore[arg-type]

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()


def test_without_a_gpu_the_cpu_build_is_installed(tmp_path: Path, cpu_index: str) -> None:
    command = choose(tmp_path, gpu=False, cpu_index=cpu_index)
    assert command.endswith(f"pip install --quiet torch==2.13.0 --index-url {cpu_index}")


def test_with_an_nvidia_gpu_the_default_index_is_used(tmp_path: Path, cpu_index: str) -> None:
    command = choose(tmp_path, gpu=True, cpu_index=cpu_index)
    assert command.endswith("pip install --quiet torch==2.13.0")


def test_an_unreachable_cpu_index_falls_back_to_the_default_index(tmp_path: Path) -> None:
    command = choose(tmp_path, gpu=False, cpu_index="http://127.0.0.1:9/")
    assert command.endswith("pip install --quiet torch==2.13.0")


LOCAL_WHEELS = Path("/opt/wheels")


@pytest.mark.skipif(
    not list(LOCAL_WHEELS.glob("torch-2.13.0*.whl")), reason="no local torch wheel here"
)
def test_a_local_wheel_comes_first_and_nothing_is_downloaded(tmp_path: Path) -> None:
    # As on this project's CI machines: a torch wheel in pip's find-links. The CPU index is
    # reachable (a stand-in would be) but never asked.
    command = choose(
        tmp_path, gpu=False, cpu_index="http://127.0.0.1:9/", PIP_CONFIG_FILE="",
        PIP_FIND_LINKS=str(LOCAL_WHEELS),
    )  # fmt: skip
    assert command.endswith("pip install --quiet torch==2.13.0")


def test_an_explicit_index_wins(tmp_path: Path, cpu_index: str) -> None:
    mirror = "https://mirror.example.com/pytorch/whl/cpu"
    command = choose(tmp_path, gpu=True, cpu_index=cpu_index, TORCH_INDEX_URL=mirror)
    assert command.endswith(f"torch==2.13.0 --index-url {mirror}")


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_serve_installs_no_dev_tools(tmp_path: Path) -> None:
    env = {**os.environ, "MAKEFLAGS": ""}
    proc = subprocess.run(
        ["make", "-n", "serve", f"SERVE_VENV={tmp_path / 'serve'}"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=60, check=True,
    )  # fmt: skip
    lines = proc.stdout.splitlines()
    assert any("scripts/install-torch.sh" in line for line in lines)
    installs = [line for line in lines if "pip install" in line and "-e" in line.split()]
    assert installs and all("dev]" not in line for line in installs), lines
    assert all("[server]" in line for line in installs), lines  # the engine and the server
    assert any(line.endswith("moderation serve ") or "moderation serve" in line for line in lines)


def test_the_image_lock_pins_every_runtime_dependency_with_hashes() -> None:
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lock = (ROOT / "requirements" / "serve.lock").read_text()
    pins: dict[str, str] = {}
    for block in lock.replace("\\\n", " ").splitlines():
        line = block.strip()
        if not line or line.startswith("#"):
            continue
        spec, *hashes = line.split("--hash=")
        name, _, version = spec.strip().partition("==")
        assert version and hashes, f"not pinned with hashes: {line[:80]}"
        pins[canonicalize_name(Requirement(name).name)] = version
    # The image serves: the base dependencies (the client) and the server extra.
    for dependency in project["dependencies"] + project["optional-dependencies"]["server"]:
        req = Requirement(dependency)
        if req.name == "torch":  # from the PyTorch index of the image's variant
            assert canonicalize_name(req.name) not in pins
            continue
        version = pins.get(canonicalize_name(req.name))
        assert version is not None, f"{req.name} is not in requirements/serve.lock"
        assert req.specifier.contains(version), f"{req.name}=={version} is not {req.specifier}"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "--require-hashes -r requirements/serve.lock" in dockerfile
    assert "!requirements/" in (ROOT / ".dockerignore").read_text()
