#!/bin/sh
# Install torch into a virtual environment unless it already has one, choosing the build:
#   - a wheel of that version on this machine (pip's find-links, e.g. a CI image's wheel
#     cache): pip as configured, nothing downloaded;
#   - an NVIDIA GPU (nvidia-smi lists one): the default index, whose Linux wheels are CUDA builds;
#   - no NVIDIA GPU: the CPU build from the PyTorch CPU index (about 200 MB instead of the CUDA
#     build plus ~15 NVIDIA wheels, several GB), or, where that index cannot be reached
#     (offline mirrors, a proxy, a machine whose wheels lie on its own disk), the default index
#     as pip is configured.
# Usage: install-torch.sh PYTHON [VERSION]. Environment: TORCH_CPU_INDEX (the CPU index URL),
# TORCH_INDEX_URL (use this index, no detection), TORCH_DRY_RUN=1 (print the pip command only).
set -eu
python=$1
version=${2:-2.13.0}
cpu_index=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

if [ -z "${TORCH_DRY_RUN:-}" ] && "$python" -c "import torch" 2>/dev/null; then
    exit 0
fi

reachable() {
    "$python" - "$1" <<'PY' 2>/dev/null
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=5).close()
except Exception:
    sys.exit(1)
PY
}

local_wheel() {
    "$python" -m pip install --quiet --dry-run --ignore-installed --no-index --no-deps \
        "torch==$version" \
        >/dev/null 2>&1
}

if [ -n "${TORCH_INDEX_URL:-}" ]; then
    why="TORCH_INDEX_URL"
    set -- --index-url "$TORCH_INDEX_URL"
elif local_wheel; then
    why="a wheel on this machine (pip's find-links)"
    set --
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    why="NVIDIA GPU found: the default index (CUDA build)"
    set --
elif reachable "$cpu_index"; then
    why="no NVIDIA GPU: the CPU build"
    set -- --index-url "$cpu_index"
else
    why="no NVIDIA GPU, $cpu_index unreachable: the default index"
    set --
fi
echo "torch $version: $why" >&2
if [ -n "${TORCH_DRY_RUN:-}" ]; then
    echo "$python -m pip install --quiet torch==$version $*"
else
    "$python" -m pip install --quiet "torch==$version" "$@"
fi
