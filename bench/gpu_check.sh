#!/usr/bin/env bash
# The GPU check, ready to run on a CUDA host from a copy of the repository, installing nothing:
#
#     bash bench/gpu_check.sh            # PYTHON=... to pick the interpreter (default python3)
#
# Needs python3 with torch (and sentencepiece, safetensors for the pytest part); does not need
# the project installed (PYTHONPATH=.), transformers, mistral-common, structlog, prometheus or
# pytest (used when present). Parts, each under its own timeout so that one hang cannot eat
# the budget (all within 8 minutes):
#   1. environment: torch, CUDA device, whether flash-attn imports, the backend auto picks
#   2. bench/gpu_parity.py: CUDA vs CPU fp32 (bf16 and fp32; wrapping window; pre-fill + decode,
#      decode-only, scoring with a reused prefix, greedy generation)
#   3. bench/gpu_bench.py: 7B memory plans; on CUDA, random 7B weights made on the device:
#      measured vs estimated activation peak, pre-fill and decode against 790 TFLOP/s and
#      4.8 TB/s, host syncs per decode step, flash vs SDPA when flash-attn imports
#   4. pytest -m gpu (tests/test_gpu.py, tests/test_flash_backend.py) when pytest is present
# The summary goes to $OUT/gpu_summary.md when OUT is set, else ./gpu_summary.md. Without CUDA
# the GPU parts say SKIP and the CPU-runnable parts (environment, 7B plans) still run.
# Exit status: 1 when a part failed or timed out.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
SUMMARY="${OUT:-.}/gpu_summary.md"
START=$(date +%s)
FAILED=0

CUDA=$(timeout 60 "$PY" -c "import torch; print('yes' if torch.cuda.is_available() else 'no')" \
    2>/dev/null || echo "unknown (torch failed to import)")
{
    echo "# GPU check"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), host ${HOSTNAME:-$(uname -n)}, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- CUDA available: $CUDA"
    if [ "$CUDA" != "yes" ]; then
        echo "- CUDA absent: the GPU parts are skipped (SKIP lines below); the CPU-runnable parts ran"
    fi
    echo
} >"$SUMMARY"

# part NAME SECONDS COMMAND...: run under a timeout, append its status and output.
part() {
    local name=$1 limit=$2
    shift 2
    local log t0 rc status
    log=$(mktemp)
    t0=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" >"$log" 2>&1
    rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status="TIMEOUT after ${limit}s"
        FAILED=1
    elif [ "$rc" -ne 0 ] || grep -q '^FAIL' "$log"; then
        status="FAIL (exit $rc)"
        FAILED=1
    elif grep -q '^SKIP' "$log"; then
        status="ok, with skips"
    else
        status="ok"
    fi
    {
        echo "## $name: $status ($(($(date +%s) - t0)) s)"
        echo
        echo '```'
        tail -n 80 "$log"
        echo '```'
        echo
    } >>"$SUMMARY"
    echo "$name: $status"
    rm -f "$log"
}

part "environment" 30 "$PY" -c '
import importlib.util, logging, platform, sys
import torch
from model.attention import flash_import_error, select_backend
logging.basicConfig(level=logging.INFO, format="log: %(name)s %(levelname)s %(message)s")
print(f"python {platform.python_version()}, torch {torch.__version__}, cuda {torch.version.cuda}")
if torch.cuda.is_available():
    free, total = torch.cuda.mem_get_info()
    print(f"device {torch.cuda.get_device_name()}, {total / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
    print("auto backend for bf16 on cuda:", select_backend("auto", torch.device("cuda"), torch.bfloat16).name)
else:
    print("SKIP device: CUDA absent")
print("flash-attn:", flash_import_error() or "imports")
print("pytest:", "present" if importlib.util.find_spec("pytest") else "absent")
'

part "CUDA vs CPU parity (bench/gpu_parity.py)" 140 "$PY" bench/gpu_parity.py

part "7B shape (bench/gpu_bench.py)" 200 "$PY" bench/gpu_bench.py

if "$PY" -c "import pytest" 2>/dev/null; then
    part "pytest -m gpu" 90 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider \
        tests/test_gpu.py tests/test_flash_backend.py
else
    {
        echo "## pytest -m gpu: skipped (pytest absent; bench/gpu_parity.py ran the same checks)"
        echo
    } >>"$SUMMARY"
    echo "pytest -m gpu: skipped (pytest absent)"
fi

echo "Total: $(($(date +%s) - START)) s; failures: $([ "$FAILED" -eq 0 ] && echo none || echo yes)" >>"$SUMMARY"
echo "summary: $SUMMARY"
exit "$FAILED"
