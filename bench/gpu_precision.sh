#!/usr/bin/env bash
# precision.int8 / precision.qaas on the GPU (device tool): bench/gpu_precision.py (correctness vs
# the quantised reference incl. qaas's decision check, accuracy vs fp32, forward speed vs SDPA
# flash and cuDNN in the same run), then the compiled conformance matrix of their Triton backends
# and the GPU part of tests/test_kernel_precision.py, with every failure reported (-rf, no -x).
# From the repo root:
#   bash bench/gpu_precision.sh [gpu_precision.py options]      (writes under $OUT)
# Timing run of the K/V pre-pass (issue 4), checks first, about 3 min on an H100:
#   SKIP_MATRIX=1 bash bench/gpu_precision.sh --skip-accuracy
# (--skip-check: timings only; --variants / --tune / --quick: see gpu_precision.py --help).
# SKIP_BENCH=1 / SKIP_MATRIX=1 skip a part; MATRIX_WORKERS (default 8, pytest-xdist: the matrix is
# dominated by Triton compiles, one per case and dtype) and *_TIMEOUT set the limits.
set -uo pipefail
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
mkdir -p /tmp/bzpath && ln -sfn "$PWD" /tmp/bzpath/blockzoo && export PYTHONPATH=/tmp/bzpath:$PYTHONPATH
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
if [ -z "${SKIP_BENCH:-}" ]; then
  timeout "${BENCH_TIMEOUT:-300}" python3 bench/gpu_precision.py "$@" 2>&1 | tee "$OUT/precision.log"
fi
if [ -z "${SKIP_MATRIX:-}" ]; then
  XDIST=""
  python3 -c "import xdist" 2>/dev/null && XDIST="-n ${MATRIX_WORKERS:-8}"
  PYT="python3 -m pytest -q -rf --tb=short -p no:cacheprovider --import-mode=importlib"
  BLOCKZOO_TEST_DEVICE=cuda BLOCKZOO_TEST_COMPONENTS=precision.int8,precision.qaas BLOCKZOO_TEST_BACKENDS=triton \
    BLOCKZOO_TEST_DTYPES=${MATRIX_DTYPES:-float32,bfloat16,float16} timeout "${MATRIX_TIMEOUT:-240}" \
    $PYT $XDIST tests/test_matrix.py > "$OUT/matrix.log" 2>&1
  echo "matrix rc=$?"; tail -30 "$OUT/matrix.log"
  timeout "${KTEST_TIMEOUT:-120}" $PYT tests/test_kernel_precision.py -k "decision or outliers or quantisation or fused" \
    > "$OUT/kernel_tests.log" 2>&1
  echo "kernel tests rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/kernel_tests.log" | tail -15
fi
