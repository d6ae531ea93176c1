"""gpu_figures.json: every figure bench/gpu_check.sh reports, null with the reason where none
was measured (no CUDA, a part that timed out, what the engine does not offer yet).

    python bench/gpu_figures.py init FILE               # every figure null, "not run yet"
    python bench/gpu_figures.py unmeasured FILE REASON PREFIX...  # a part failed: say why
    python bench/gpu_figures.py part FILE NAME STATUS SECONDS    # how a part ended
    python bench/gpu_figures.py summary FILE    # the readable summary (a Markdown table)
    python bench/gpu_figures.py failed FILE   # exit 1 when a bounded correctness check failed

Each measured figure is {"value", "unit", "goal", "met", "detail"}; `met` is null where the
figure has no goal. The goals are those of issue #24 (an H200: 989 TFLOP/s dense bf16,
4.8 TB/s of HBM). Standard library only: it runs where nothing else imports.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

PEAK_TFLOPS = 989.0  # H200 dense bf16
PEAK_TBPS = 4.8  # H200 HBM3e

_DECODE = {
    f"decode.{mode}.batch{b}.ctx{c}": ("tokens/s", ">= 75% of the HBM roofline" if b == 1 else None)
    for mode in ("eager", "graphed")
    for b in (1, 32)
    for c in (1024, 4096)
}
FIGURES: dict[str, tuple[str, str | None]] = {
    "parity.cuda_vs_cpu": ("checks passed", "all (bench/gpu_parity.py)"),
    "parity.transformers_cuda.bf16": ("max |logit diff| / logit scale", "<= 0.06"),
    "parity.transformers_cuda.fp32": ("max |logit diff| / logit scale", "<= 0.001"),
    "startup_seconds": ("s", None),
    "capture_seconds": ("s", None),
    "prefill.tokens_per_s": ("tokens/s", None),
    "prefill.mfu": (f"fraction of {PEAK_TFLOPS:.0f} TFLOP/s", ">= 0.5"),
    **_DECODE,
    "decisions_per_s": ("decisions/s (20-token texts, mistral-13)", ">= 1000"),
    "classify_latency_ms.p50": ("ms (one caller)", "<= 15"),
    "classify_latency_ms.p99": ("ms (one caller)", None),
    "host_syncs_per_decode_step": ("syncs", "<= 1"),
    "memory_plan.7b.this_card": ("slots (generation + scoring)", None),
    "memory_plan.7b.h200_141gb": ("slots (generation + scoring)", None),
    "memory_plan.7b.h100_80gb": ("slots (generation + scoring)", None),
    "activation_peak_vs_estimate": ("measured / estimated", "<= 1"),
    "backends.flex_vs_sdpa": ("max |logit diff| / logit scale", "<= 0.06"),
    "backends.flash_vs_sdpa": ("max |logit diff| / logit scale", "<= 0.06"),
}


# Bounded differences: a miss is a failure of the check (the speed goals are figures to read).
CORRECTNESS = (
    "parity.cuda_vs_cpu",
    "parity.transformers_cuda.bf16",
    "parity.transformers_cuda.fp32",
    "backends.flex_vs_sdpa",
    "backends.flash_vs_sdpa",
)


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _save(path: Path, data: dict[str, Any]) -> None:
    # Written whole and renamed: a part killed at its timeout never leaves half a file.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def init(path: Path) -> None:
    data = {
        "schema": "gpu_figures/1",
        "peak": {"tflops_bf16": PEAK_TFLOPS, "hbm_tbps": PEAK_TBPS},
        "environment": {},
        "figures": dict.fromkeys(FIGURES),
        "reasons": dict.fromkeys(FIGURES, "not measured: its part did not run"),
        "parts": {},
    }
    _save(path, data)


class FigureFile:
    """gpu_figures.json, updated in place after each figure (a timeout keeps what was done)."""

    def __init__(self, path: Path):
        self.path = path
        if not path.exists():
            init(path)

    def set(self, name: str, value: Any, *, detail: str = "", met: bool | None = None) -> None:
        unit, goal = FIGURES[name]
        data = _load(self.path)
        data["figures"][name] = {"value": value, "unit": unit, "goal": goal, "met": met,
                                 "detail": detail}  # fmt: skip
        data["reasons"].pop(name, None)
        _save(self.path, data)
        print(f"{name}: {value} {unit}" + (f" ({detail})" if detail else ""), flush=True)

    def null(self, name: str, reason: str) -> None:
        data = _load(self.path)
        data["figures"][name] = None
        data["reasons"][name] = reason
        _save(self.path, data)
        print(f"SKIP {name}: {reason}", flush=True)

    def unmeasured(self, prefix: str, reason: str) -> None:
        """Every figure under `prefix` still null gets this reason."""
        data = _load(self.path)
        for name in FIGURES:
            if name.startswith(prefix) and data["figures"].get(name) is None:
                data["reasons"][name] = reason
        _save(self.path, data)

    def environment(self, **facts: Any) -> None:
        data = _load(self.path)
        data["environment"].update(facts)
        _save(self.path, data)

    def part(self, name: str, status: str, seconds: float) -> None:
        data = _load(self.path)
        data["parts"][name] = {"status": status, "seconds": round(seconds, 1)}
        _save(self.path, data)


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def summary(path: Path) -> str:
    """The figures as a Markdown table, then the environment and the parts."""
    data = _load(path)
    lines = ["| figure | value | unit | goal | met | detail |", "|---|---|---|---|---|---|"]
    for name in FIGURES:
        fig = data["figures"].get(name)
        if fig is None:
            reason = data["reasons"].get(name, "")
            lines.append(f"| {name} | null | | {FIGURES[name][1] or ''} | | {reason} |")
            continue
        met = {True: "yes", False: "NO", None: ""}[fig["met"]]
        lines.append(f"| {name} | {_show(fig['value'])} | {fig['unit']} | {fig['goal'] or ''} "
                     f"| {met} | {fig['detail']} |")  # fmt: skip
    lines += ["", "Environment:"]
    lines += [f"- {k}: {v}" for k, v in sorted(data["environment"].items())]
    lines += ["", "Parts:"]
    lines += [f"- {k}: {v['status']} ({v['seconds']} s)" for k, v in data["parts"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if argv[:1] == ["init"] and len(argv) == 2:
        init(Path(argv[1]))
    elif argv[:1] == ["unmeasured"] and len(argv) >= 4:
        for prefix in argv[3:]:
            FigureFile(Path(argv[1])).unmeasured(prefix, argv[2])
    elif argv[:1] == ["part"] and len(argv) == 5:
        FigureFile(Path(argv[1])).part(argv[2], argv[3], float(argv[4]))
    elif argv[:1] == ["summary"] and len(argv) == 2:
        print(summary(Path(argv[1])), end="")
    elif argv[:1] == ["failed"] and len(argv) == 2:
        figures = _load(Path(argv[1]))["figures"]
        bad = [n for n in CORRECTNESS if (figures.get(n) or {}).get("met") is False]
        for name in bad:
            print(f"FAIL {name}: {figures[name]['value']} (bound {figures[name]['goal']})")
        return 1 if bad else 0
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
