"""The layout's promises that an import graph cannot show: what really gets imported at run
time. (The static import rules are import-linter contracts, checked by `lint-imports`.)"""

from __future__ import annotations

import subprocess
import sys


def _modules_after(imports: str) -> set[str]:
    code = f"import sys; {imports}; print('\\n'.join(sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    return set(out.split())


SERVER_EXTRA = ("torch", "numpy", "sentencepiece", "safetensors", "structlog", "prometheus_client")


def test_the_light_client_runs_without_torch_or_the_engine() -> None:
    loaded = _modules_after("import moderation.api.client, moderation.api.convert")
    assert "moderation.api.client" in loaded
    assert not {m for m in loaded if m == "torch" or m.startswith(("torch.", "model"))}


def test_the_client_loads_only_grpc_protobuf_and_the_stubs() -> None:
    loaded = _modules_after("import moderation.api.client")
    ours = {m for m in loaded if m.split(".")[0] in ("moderation", "model")}
    stubs = {"moderation.v1", "moderation.v1.moderation_pb2", "moderation.v1.moderation_pb2_grpc"}
    assert ours == {"moderation", "moderation.api", "moderation.api.client", *stubs}
    assert not {m for m in loaded if m.split(".")[0] in SERVER_EXTRA}
    # the OpenAI stream guard is as light
    loaded = _modules_after("import moderation.api.guard")
    ours = {m for m in loaded if m.split(".")[0] in ("moderation", "model")}
    assert ours == {
        "moderation",
        "moderation.api",
        "moderation.api.client",
        "moderation.api.guard",
        *stubs,
    }
    assert not {m for m in loaded if m.split(".")[0] in SERVER_EXTRA}


def test_the_command_and_remote_scoring_load_no_engine() -> None:
    # `moderation batch --target` runs where only the light client is installed. (Building
    # the parser here loads the server's settings, for `serve`'s options: the server extra is
    # installed in this environment. Without it, tests/test_client_install.py.)
    loaded = _modules_after("import moderation.cli, moderation.jobs.scoring, moderation.api.remote")
    assert "moderation.cli" in loaded
    assert not {m for m in loaded if m.split(".")[0] in (*SERVER_EXTRA, "model")}


def test_the_domain_core_runs_without_grpc_or_an_event_loop() -> None:
    loaded = _modules_after("import moderation.core.decision, moderation.core.policy")
    assert "moderation.core.decision" in loaded
    assert not {m for m in loaded if m.split(".")[0] in ("grpc", "asyncio", "torch")}


def test_the_engine_imports_with_torch_alone() -> None:
    """A GPU image may have torch and nothing else (bench/gpu_check.sh): the tokenizer's
    sentencepiece and the checkpoint reader's safetensors load on first use only."""
    loaded = _modules_after("import model, model.engine, model.memory")
    assert "model.engine" in loaded
    assert not loaded & {"sentencepiece", "safetensors", "model.tokenizer", "model.weights"}


def test_no_module_imports_another_modules_private_names() -> None:
    """A leading underscore means "this module's own": the engine's parts (passes, scoring,
    stream checks) and the service reach each other through public names only."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    found = []
    for package in ("model", "moderation"):
        for path in (root / package).rglob("*.py"):
            if "v1" in path.relative_to(root).parts:  # generated gRPC code
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    if node.module.split(".")[0] not in ("model", "moderation"):
                        continue
                    private = [a.name for a in node.names if a.name.startswith("_")]
                    found += [f"{path.relative_to(root)}: {node.module}.{n}" for n in private]
    assert not found
