#!/usr/bin/env bash
# The GPU check, for the machine it will meet: a bare image with Python 3.12, torch + CUDA and
# triton, no network. Run from a copy of the repository; installs nothing system-wide:
#
#     bash bench/gpu_check.sh        # PYTHON=... picks the interpreter (default python3)
#
# The engine parts import torch alone (model/__init__.py imports the tokenizer and the
# checkpoint reader lazily). What else a figure needs (transformers for the reference parity;
# sentencepiece and mistral-common's tokenizer file for decisions/s and Classify latency;
# pytest) comes from gpu-bundle/, which `make gpu-bundle` fills on a machine with an index
# (bench/gpu_bundle.py: cp312 manylinux x86-64 wheels, under 64 MiB, git-ignored): each wheel
# whose module does not import here is unpacked into a temporary folder (GPU_BUNDLE names
# another folder). A figure whose needs
# are missing is null, with the reason.
#
# Writes $OUT/gpu_figures.json (bench/gpu_figures.py: every figure, null with the reason where
# none was measured) and $OUT/gpu_summary.md (the figures as a table, then each part's log);
# OUT defaults to the current folder. Parts (bench/gpu_measure.py), each under its own timeout
# and all within GPU_CHECK_BUDGET seconds (default 460: the whole check in under 8 minutes):
#   env       torch, CUDA, triton, flash-attn, the backends the engine accepts, optional modules
#   plan      the 7B memory plan (--max-batch-size auto): this card, simulated 141 / 80 GB cards
#   parity    CUDA vs CPU (bench/gpu_parity.py, bf16 and fp32, wrapping window); ours vs
#             transformers on CUDA at the 7B layer shape (bf16, fp32)
#   engine    random 7B bf16: start-up, pre-fill tok/s and MFU (989 TFLOP/s), eager decode at
#             batch 1 and 32, contexts 1k and 4k (batch held fixed) against the 4.8 TB/s
#             roofline, host syncs per step, decisions/s and one caller's Classify p50/p99
#   backends  flex and flash against SDPA where the engine offers them, each difference bounded
#   graphed   Engine(compile=True): capture time, graphed decode at the same points
#   pytest    pytest -m gpu, when pytest imports and time is left
# Without CUDA every CUDA figure is null ("CUDA absent") and the check exits 0. Exit status 1:
# a part failed or timed out, or a bounded difference (parity, backends) was exceeded.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-.}
mkdir -p "$OUT_DIR"
FIGURES="$OUT_DIR/gpu_figures.json"
SUMMARY="$OUT_DIR/gpu_summary.md"
LOGS=$(mktemp)
BUDGET=${GPU_CHECK_BUDGET:-460}
START=$(date +%s)
FAILED=0

"$PY" bench/gpu_figures.py init "$FIGURES"

BUNDLE=${GPU_BUNDLE:-gpu-bundle}
SITE=""
if ls "$BUNDLE"/*.whl >/dev/null 2>&1; then
    SITE=$(mktemp -d)
    trap 'rm -rf "$SITE"' EXIT
    {
        echo "## bundle ($BUNDLE into $SITE)"
        echo '```'
        "$PY" bench/gpu_bundle.py install "$BUNDLE" "$SITE" 2>&1 | tail -n 60
        echo '```'
    } >>"$LOGS"
    # After the image's own paths' PYTHONPATH entries: only what did not import is there.
    export PYTHONPATH="$PYTHONPATH:$SITE"
else
    echo "## bundle: none in $BUNDLE (make gpu-bundle builds it)" >>"$LOGS"
fi

# part NAME LIMIT PREFIX...: run a gpu_measure part under a timeout within the budget; when it
# fails, its figures still null say so.
part() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt 20 ]; then
        "$PY" bench/gpu_figures.py unmeasured "$FIGURES" \
            "part $name skipped: no time left in the ${BUDGET}s budget" "$@"
        "$PY" bench/gpu_figures.py part "$FIGURES" "$name" skipped 0
        echo "$name: skipped (no time left)"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local log t0 rc status
    log=$(mktemp)
    t0=$(date +%s)
    PYTHONUNBUFFERED=1 timeout --kill-after=5 "$limit" "$PY" bench/gpu_measure.py "$name" \
        "$FIGURES" >"$log" 2>&1
    rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status="timeout after ${limit}s"
    elif [ "$rc" -ne 0 ]; then
        status="failed (exit $rc)"
    else
        status="ok"
    fi
    if [ "$status" != ok ]; then
        FAILED=1
        "$PY" bench/gpu_figures.py unmeasured "$FIGURES" "part $name: $status" "$@"
    fi
    "$PY" bench/gpu_figures.py part "$FIGURES" "$name" "$status" "$(($(date +%s) - t0))"
    {
        echo "## $name: $status ($(($(date +%s) - t0)) s)"
        echo '```'
        tail -n 60 "$log"
        echo '```'
    } >>"$LOGS"
    echo "$name: $status"
    rm -f "$log"
}

part env 40
part plan 40 memory_plan.
part parity 120 parity.
part engine 170 startup prefill. decode.eager decisions classify host_syncs activation
part backends 60 backends.
part graphed 150 decode.graphed capture

left=$((BUDGET - ($(date +%s) - START)))
if "$PY" -c "import pytest, torch; assert torch.cuda.is_available()" 2>/dev/null && [ "$left" -ge 60 ]; then
    log=$(mktemp)
    timeout --kill-after=5 50 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider \
        tests/test_gpu.py tests/test_flash_backend.py >"$log" 2>&1 || FAILED=1
    { echo "## pytest -m gpu"; echo '```'; tail -n 40 "$log"; echo '```'; } >>"$LOGS"
    rm -f "$log"
else
    echo "## pytest -m gpu: skipped (needs pytest, CUDA and 60 s left; gpu_parity ran its checks)" >>"$LOGS"
fi

"$PY" bench/gpu_figures.py failed "$FIGURES" >>"$LOGS" || FAILED=1
{
    echo "# GPU check"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), host ${HOSTNAME:-$(uname -n)}, commit" \
        "$(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(($(date +%s) - START)) s," \
        "failures: $([ "$FAILED" -eq 0 ] && echo none || echo yes)"
    echo
    "$PY" bench/gpu_figures.py summary "$FIGURES"
    echo
    cat "$LOGS"
} >"$SUMMARY"
rm -f "$LOGS"
echo "figures: $FIGURES; summary: $SUMMARY"
exit "$FAILED"
