#!/usr/bin/env bash
# Compiled correctness only (device tool): the conformance matrix of the Triton backends on CUDA
# and the kernel tests. Usage from the repo root: bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
mkdir -p /tmp/bzpath && ln -sfn "$PWD" /tmp/bzpath/blockzoo && export PYTHONPATH=/tmp/bzpath:$PYTHONPATH
BLOCKZOO_TEST_DEVICE=cuda BLOCKZOO_TEST_BACKENDS=triton,reference BLOCKZOO_TEST_DTYPES=float32,bfloat16,float16 \
  python3 -m pytest tests/test_matrix.py -q -p no:cacheprovider --import-mode=importlib 2>&1 | tee "$OUT/matrix.log" | tail -15
python3 -m pytest tests/test_kernel_triton_attention.py tests/test_kernel_triton_norm_act.py -q -p no:cacheprovider \
  --import-mode=importlib 2>&1 | tee "$OUT/kernel_tests.log" | tail -15
