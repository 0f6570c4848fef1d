#!/usr/bin/env bash
# The foundation's GPU run (device tool): compiled correctness of every Triton backend against the
# reference, then `blockzoo bench` for the baseline components against SDPA flash / cuDNN /
# efficient and torch eager, all in one run. Usage on the GPU machine, from the repo root:
#   bash bench/gpu_foundation.sh            (writes JSON and logs under $OUT)
set -uo pipefail
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
# run from the tree: expose the checkout as the package `blockzoo`
mkdir -p /tmp/bzpath && ln -sfn "$PWD" /tmp/bzpath/blockzoo && export PYTHONPATH=/tmp/bzpath:$PYTHONPATH
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
echo "== compiled Triton conformance matrix (cuda) =="
BLOCKZOO_TEST_DEVICE=cuda BLOCKZOO_TEST_BACKENDS=triton,reference BLOCKZOO_TEST_DTYPES=float32,bfloat16,float16 \
  python3 -m pytest tests/test_matrix.py -q -x -p no:cacheprovider --import-mode=importlib 2>&1 | tee "$OUT/matrix.log" | tail -5
echo "== kernel tests, compiled =="
python3 -m pytest tests/test_kernel_triton_attention.py tests/test_kernel_triton_norm_act.py -q -x -p no:cacheprovider \
  --import-mode=importlib 2>&1 | tee "$OUT/kernel_tests.log" | tail -3
echo "== bench =="
python3 -m blockzoo.cli bench --device cuda --component attention.dense --json "$OUT/bench_attention.json" 2>&1 | tee "$OUT/bench_attention.txt"
python3 -m blockzoo.cli bench --device cuda --component normres.rmsnorm --component normres.layernorm \
  --dtype bfloat16 --dtype float32 --json "$OUT/bench_norm.json" 2>&1 | tee "$OUT/bench_norm.txt"
python3 -m blockzoo.cli bench --device cuda --component mlp.swiglu --component mlp.gelu \
  --json "$OUT/bench_mlp.json" 2>&1 | tee "$OUT/bench_mlp.txt"
echo "== norm tuning sweep: fp32, RMSNorm, no-delta, torch.compile =="
python3 bench/triton_norm_tune.py --compile 4096,16384 --dtypes bf16,fp32 --budget ${NORM_BUDGET:-150} --out "$OUT" 2>&1 | tail -40
