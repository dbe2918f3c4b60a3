#!/usr/bin/env bash
# One prepared GPU run, under 8 minutes on one CUDA GPU:
#   1. refuse to run without CUDA (exit 2, "device_check: no CUDA device" on stderr): a GPU
#      check that fell back to the CPU would report results it never measured;
#   2. the device-capable tests (tests/device.py's DIFFDET_TEST_DEVICE=cuda);
#   3. tools/benchmark.py on CUDA at 1@300 and 4@500: fp32, TF32 and bf16 autocast at batch 1
#      and 8, the graph sampling mode eager and compiled (one CUDA graph per step), images/s and
#      max detection difference from the fp32 reference; then the roofline (time against the
#      fp32 GEMM peak) and, with the budget left, COMPILE_HEAD at batch 1;
#   4. everything logged to $OUT/device_check.log (the GPU runner returns $OUT), else to
#      output/device_check/.
# Device time is scarce and billed from the machine's start, so each step has its own timeout
# within one overall budget (DEVICE_CHECK_BUDGET_S, default 450 s), a hung step cannot take the
# others' time, and every step runs even when an earlier one failed. Exit 1 if any step failed.
#
#   bash tools/dev/device_check.sh              # PYTHON=... to choose the interpreter
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"  # two levels above tools/dev/
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
LOG_DIR="${OUT:-output/device_check}"
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/device_check.log"
: >"$LOG"
BUDGET_S="${DEVICE_CHECK_BUDGET_S:-450}"
FAILED=()

log() { echo "$*" | tee -a "$LOG"; }

if ! timeout 60 "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
    >>"$LOG" 2>&1; then
    echo "device_check: no CUDA device (torch.cuda.is_available() is not True for $PYTHON); nothing run" \
        | tee -a "$LOG" >&2
    exit 2
fi

# step NAME LIMIT_S CMD...: run CMD under min(LIMIT_S, budget left), log to $LOG and NAME.log.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - SECONDS))
    if ((left < 30)); then
        log "== $name: SKIPPED, ${BUDGET_S} s budget spent"
        FAILED+=("$name (skipped)")
        return
    fi
    ((limit > left)) && limit=$left
    log "== $name (limit ${limit} s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG" "$LOG_DIR/$name.log"
    local rc=${PIPESTATUS[0]}
    log "== $name: exit $rc after $((SECONDS - start)) s$([[ $rc == 124 ]] && echo ' (TIMED OUT)')"
    ((rc == 0)) || FAILED+=("$name (exit $rc)")
}

CASES=(--device cuda --cases 1@300,4@500 --image-size 800)
ENV_PROBE='import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))
print("TF32 allowed: matmul", torch.backends.cuda.matmul.allow_tf32,
      "cuDNN", torch.backends.cudnn.allow_tf32)'
timeout 20 nvidia-smi >>"$LOG" 2>&1 || log "nvidia-smi: not available"
step environment 30 "$PYTHON" -c "$ENV_PROBE"
step tests 120 env DIFFDET_TEST_DEVICE=cuda "$PYTHON" -m pytest -q -p no:cacheprovider \
    tests/test_device_check.py tests/test_roofline.py
step benchmark 120 "$PYTHON" tools/benchmark.py "${CASES[@]}" --batches 1,8 --amp bf16 --tf32 \
    --repeats 3 --train-iters 2
# SAMPLING_MODE graph: eager, then each step compiled with fullgraph=True and captured as a CUDA
# graph per (batch, boxes) (mode "reduce-overhead"); 4 compilations, hence the longer limit.
step graph 200 "$PYTHON" tools/benchmark.py --graph "${CASES[@]}" --batches 1,8 --amp "" \
    --repeats 3 --train-iters 0
step roofline 45 "$PYTHON" tools/benchmark.py --roofline "${CASES[@]}" --batches 1,8
# Last: compilation takes the rest of the budget, and may be unsupported (no Triton / compiler).
step compile 120 "$PYTHON" tools/benchmark.py --compile "${CASES[@]}" --batches 1 --amp "" \
    --train-iters 0

if ((${#FAILED[@]})); then
    echo "device_check: FAILED: ${FAILED[*]} (log: $LOG, $SECONDS s)" | tee -a "$LOG" >&2
    exit 1
fi
log "device_check: all steps passed in $SECONDS s (log: $LOG)"
