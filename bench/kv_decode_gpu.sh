#!/usr/bin/env bash
# KV-cache decode kernels on the GPU (device tool): bench/kv_decode_gpu.py (correctness of the
# compiled kernels, then timings and peak memory against SDPA / torch in the same run, and the fused
# H2O step against the old policy path (issue 7)), then the
# compiled conformance matrix of the token.* Triton backends and the GPU part of
# tests/test_kernel_kv_decode.py. From the repo root:  bash bench/kv_decode_gpu.sh   (writes $OUT)
set -uo pipefail
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
mkdir -p /tmp/bzpath && ln -sfn "$PWD" /tmp/bzpath/blockzoo && export PYTHONPATH=/tmp/bzpath:$PYTHONPATH
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
if [ -z "${SKIP_BENCH:-}" ]; then
  timeout "${BENCH_TIMEOUT:-260}" python3 bench/kv_decode_gpu.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | tail -60
fi
if [ -z "${SKIP_TESTS:-}" ]; then
  PYT="python3 -m pytest -q -rf --tb=short -p no:cacheprovider --import-mode=importlib"
  BLOCKZOO_TEST_DEVICE=cuda BLOCKZOO_TEST_COMPONENTS=token.streaming,token.h2o,token.snapkv BLOCKZOO_TEST_BACKENDS=triton \
    BLOCKZOO_TEST_DTYPES=float32,bfloat16,float16 timeout "${MATRIX_TIMEOUT:-90}" $PYT tests/test_matrix.py > "$OUT/matrix.log" 2>&1
  echo "matrix rc=$?"; tail -8 "$OUT/matrix.log"
  timeout "${KTEST_TIMEOUT:-150}" $PYT tests/test_kernel_kv_decode.py -k "triton or select" > "$OUT/kernel_tests.log" 2>&1
  echo "kernel tests rc=$?"; tail -8 "$OUT/kernel_tests.log"
fi
