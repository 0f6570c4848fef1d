#!/usr/bin/env bash
# precision.int8 / precision.qaas on the GPU (device tool): compiled conformance matrix of their
# Triton backends, then bench/gpu_precision.py (correctness vs the quantised reference, accuracy vs
# fp32, forward speed vs SDPA flash and cuDNN in the same run). From the repo root:
#   bash bench/gpu_precision.sh [gpu_precision.py options]      (writes under $OUT)
set -uo pipefail
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
mkdir -p /tmp/bzpath && ln -sfn "$PWD" /tmp/bzpath/blockzoo && export PYTHONPATH=/tmp/bzpath:$PYTHONPATH
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
timeout ${BENCH_TIMEOUT:-400} python3 bench/gpu_precision.py "$@" 2>&1 | tee "$OUT/precision.log"
if [ -z "${SKIP_MATRIX:-}" ]; then
  BLOCKZOO_TEST_DEVICE=cuda BLOCKZOO_TEST_COMPONENTS=precision.int8,precision.qaas BLOCKZOO_TEST_BACKENDS=triton \
    BLOCKZOO_TEST_DTYPES=${MATRIX_DTYPES:-float32,bfloat16,float16} timeout ${MATRIX_TIMEOUT:-120} \
    python3 -m pytest tests/test_matrix.py -q ${MATRIX_FLAGS:-} -p no:cacheprovider --import-mode=importlib 2>&1 | tee "$OUT/matrix.log" | tail -8
fi
