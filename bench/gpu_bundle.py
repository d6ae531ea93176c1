"""The wheels bench/gpu_check.sh needs beyond torch, for a GPU machine that cannot download.

    python bench/gpu_bundle.py build [DIR]     # `make gpu-bundle`: on a machine with an index
    python bench/gpu_bundle.py install DIR TARGET   # gpu_check.sh, on the GPU machine

`build` downloads, for CPython 3.12 on manylinux x86-64 (what the GPU image runs), the
wheels of transformers (the CUDA parity against the reference implementation), sentencepiece
and mistral-common's tokenizer files (the decisions/s and Classify latency figures, which need
the real tokenizer), safetensors, pytest and their dependencies, and refuses a bundle over
64 MiB (what a device run carries). mistral-common is fetched without its dependencies: only
its data files are read. `install` unpacks into TARGET each wheel whose module does not
already import, so that what the image has (its own numpy, transformers, ...) is kept; a
wheel is a zip archive, so no pip is needed there. Standard library only.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "gpu-bundle"
LIMIT_BYTES = 64 << 20
# What gpu_check.sh uses when present; their dependencies come with them.
PACKAGES = ("transformers", "sentencepiece", "safetensors", "pytest", "pytest-timeout")
NO_DEPS = ("mistral-common",)  # only its tokenizer files are read (model/tokenizer.py)
PLATFORM = [
    "--only-binary=:all:",
    "--python-version", "3.12",
    "--implementation", "cp",
    "--platform", "manylinux_2_28_x86_64",
    "--platform", "manylinux_2_27_x86_64",
    "--platform", "manylinux_2_17_x86_64",
    "--platform", "manylinux2014_x86_64",
]  # fmt: skip


def build(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--quiet", *PLATFORM, "-d", str(folder)]
    subprocess.run([*pip, *PACKAGES], check=True)
    subprocess.run([*pip, "--no-deps", *NO_DEPS], check=True)
    wheels = sorted(folder.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels)
    print(f"{len(wheels)} wheels, {size / (1 << 20):.1f} MiB in {folder}")
    if size > LIMIT_BYTES:
        print(f"over the {LIMIT_BYTES >> 20} MiB a device run carries", file=sys.stderr)
        return 1
    return 0


def top_level(wheel: zipfile.ZipFile) -> list[str]:
    """The importable top-level names a wheel installs (packages and modules)."""
    names = set()
    for entry in wheel.namelist():
        first = entry.split("/")[0]
        if first.endswith((".dist-info", ".data")) or first.startswith("_"):
            continue
        if "/" in entry or first.endswith((".py", ".so")):
            names.add(first.split(".")[0])
    return sorted(names)


def install(folder: Path, target: Path) -> int:
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(folder.glob("*.whl")):
        with zipfile.ZipFile(path) as wheel:
            names = top_level(wheel)
            present = [n for n in names if importlib.util.find_spec(n) is not None]
            if names and len(present) == len(names):
                print(f"kept the image's {', '.join(names)} ({path.name} not unpacked)")
                continue
            wheel.extractall(target)
            print(f"unpacked {path.name}")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["build"]:
        return build(Path(argv[1]) if len(argv) > 1 else DEFAULT_DIR)
    if argv[:1] == ["install"] and len(argv) == 3:
        return install(Path(argv[1]), Path(argv[2]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
