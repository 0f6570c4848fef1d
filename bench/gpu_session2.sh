#!/usr/bin/env bash
# Session-2 GPU run (device tool): compiled correctness of normres.dyt/agu and context.moc, their
# `blockzoo bench` rows against copy / torch eager / SDPA, and the MoC routing+density study.
#   bash bench/gpu_session2.sh      (from the repo root; JSON and logs under $OUT)
set -uo pipefail
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
mkdir -p /tmp/bzpath && ln -sfn "$PWD" /tmp/bzpath/blockzoo && export PYTHONPATH=/tmp/bzpath:$PYTHONPATH
export PYTHONUNBUFFERED=1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/gpu.txt"
echo "== moc study =="
python3 bench/moc_gpu.py --out "$OUT" 2>&1 | tail -9
echo "== compiled matrix: dyt, agu, moc =="
BLOCKZOO_TEST_DEVICE=cuda BLOCKZOO_TEST_BACKENDS=triton,reference BLOCKZOO_TEST_DTYPES=float32,bfloat16,float16 \
BLOCKZOO_TEST_COMPONENTS=normres.dyt,normres.agu,context.moc \
  python3 -m pytest tests/test_matrix.py -q -p no:cacheprovider --import-mode=importlib 2>&1 | tee "$OUT/matrix.log" | tail -4
python3 -m pytest tests/test_kernel_normres_gated.py tests/test_kernel_moc.py -q -p no:cacheprovider \
  --import-mode=importlib 2>&1 | tee "$OUT/kernel_tests.log" | tail -4
echo "== bench dyt/agu =="
python3 -m blockzoo.cli bench --device cuda --component normres.dyt --component normres.agu \
  --dtype bfloat16 --dtype float32 --json "$OUT/bench_gated.json" 2>&1 | tail -45
