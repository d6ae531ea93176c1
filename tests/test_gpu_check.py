"""bench/gpu_check.sh on the machine it will meet, as far as a CPU host can show it: with every
third-party module but torch (and what torch itself imports) made unimportable, it runs every
part, reports each CUDA figure null with the reason, plans the 7B anyway, and exits 0; and the
sync counter it relies on counts."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from bench.gpu_bench import count_host_syncs
from bench.gpu_figures import FIGURES

ROOT = Path(__file__).resolve().parent.parent


def test_sync_counter_counts_scalar_reads_nonzero_and_copies() -> None:
    x = torch.arange(5.0)
    counts = count_host_syncs(
        lambda: (x.sum().item(), torch.nonzero(x), x.to("meta")), device_type="cpu"
    )
    assert (counts["item"], counts["nonzero"], counts["syncs"]) == (1, 1, 2)


def _torch_and_its_requirements() -> set[str]:
    """Distributions torch needs to import (its requirements, transitively, no extras)."""
    names, todo = set(), ["torch"]
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in names:
            continue
        names.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0] for r in requires if "extra" not in r]
    return names


def _blocker(folder: Path) -> list[str]:
    """A sitecustomize.py that makes every installed top-level module unimportable except
    torch's (and this project's own); returns the blocked names."""
    allowed = _torch_and_its_requirements() | {"mistral-moderation"}
    blocked = sorted(
        module
        for module, dists in importlib.metadata.packages_distributions().items()
        if not any(re.sub(r"[-_.]+", "-", d).lower() in allowed for d in dists)
        and module not in ("model", "moderation", "bench", "tests")
        and not module.startswith("__editable__")
    )
    # None in sys.modules: an import raises ModuleNotFoundError and find_spec answers None,
    # as for a module that is not installed.
    (folder / "sitecustomize.py").write_text(
        f"import sys\nfor name in {blocked!r}:\n    sys.modules.setdefault(name, None)\n"
    )
    return blocked


def test_gpu_check_runs_with_torch_alone_and_reports_cuda_figures_null(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        return  # on a GPU host the script is run for real, not from the test suite
    site = tmp_path / "site"
    site.mkdir()
    blocked = _blocker(site)
    assert {"transformers", "sentencepiece", "safetensors", "pytest"} <= set(blocked)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "PYTHONPATH": str(site),
           "GPU_BUNDLE": str(tmp_path / "no-bundle")}  # fmt: skip
    # The blocker holds: the engine imports, the tokenizer's module does not.
    code = "import model, model.engine; import sentencepiece"
    probe = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert "import of sentencepiece halted; None in sys.modules" in probe.stderr, probe.stderr
    done = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    summary = (out / "gpu_summary.md").read_text()
    assert done.returncode == 0, done.stdout + done.stderr + summary
    data = json.loads((out / "gpu_figures.json").read_text())
    assert set(data["figures"]) == set(FIGURES)
    assert all(p["status"] == "ok" for p in data["parts"].values()), data["parts"]
    assert set(data["parts"]) == {"env", "plan", "parity", "engine", "backends", "graphed"}
    # Every CUDA figure is null, with the reason; the 7B plans are arithmetic and are there.
    planned = {"memory_plan.7b.h200_141gb", "memory_plan.7b.h100_80gb"}
    for name, value in data["figures"].items():
        if name in planned:
            assert value["value"] > 64 and "auto: as many as fit" in value["detail"]
        else:
            assert value is None and "CUDA absent" in data["reasons"][name], name
    assert data["environment"]["transformers"].startswith("transformers does not import")
    assert "make gpu-bundle" in data["environment"]["sentencepiece"]
    assert "| memory_plan.7b.h200_141gb | 198 |" in summary
    assert "| prefill.mfu | null | | >= 0.5 | | CUDA absent" in summary


def test_the_engine_part_rehearsed_on_cpu_measures_every_figure(tmp_path: Path) -> None:
    """The measuring code of the GPU check runs nowhere else before a GPU session: rehearsed
    on a tiny model on the CPU (GPU_CHECK_REHEARSE), the engine part fills every one of its
    figures (meaningless values, real code: the fixed-batch decode, decisions/s through the
    classifier, Classify latency, host syncs)."""
    figures = tmp_path / "gpu_figures.json"
    env = {**os.environ, "GPU_CHECK_REHEARSE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "bench/gpu_measure.py", "engine", str(figures)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(figures.read_text())
    measured = {n for n, v in data["figures"].items() if v is not None}
    decode = {f"decode.eager.batch{b}.ctx{c}" for b in (1, 32) for c in (1024, 4096)}
    expected = {
        "startup_seconds", "memory_plan.7b.this_card", "prefill.tokens_per_s", "prefill.mfu",
        "host_syncs_per_decode_step", "decisions_per_s", "classify_latency_ms.p50",
        "classify_latency_ms.p99", *decode,
    }  # fmt: skip
    assert measured == expected, data["reasons"]
    assert "FAIL" not in done.stdout
    assert "batch held at 3" in data["figures"]["decode.eager.batch32.ctx4096"]["detail"]
    assert data["figures"]["decisions_per_s"]["value"] > 0
