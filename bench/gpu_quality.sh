#!/usr/bin/env bash
# The GPU quality sweeps of issues 7 and 8 (examples/sweeps/{kv_policies,temf,membank}_gpu.yaml) on
# the device machine, ONE AT A TIME (at once they time-slice the GPU across all their worker
# processes: ~36 ms per training step each instead of ~4 ms, session 7), each under its own time
# limit, sweeping into $RUNS and copying only report.md, results.jsonl, the plots and the log tail
# to $OUT (a sweep folder's specs/ alone exceeds what the device tool brings back). A sweep cut by
# its limit keeps its finished trials; rerunning with the same $RUNS resumes it.
# From the repo root:
#   bash bench/gpu_quality.sh                                   # all three, 400 s each (2026-11-24 runs: 196, 261, 353 s)
#   SWEEPS="temf_gpu:4" BUDGET=560 bash bench/gpu_quality.sh    # one sweep (name:workers), one limit
# First check that the dense model learns mqar recall with the sweeps' recipe (seed-dependent at
# d_model 64 / 2 layers / lr 1e-3; the sweeps now use 4 layers at lr 3e-3, docs/sweeps.md "Tasks"):
#   python3 bench/mqar_probe.py --device cuda --graph --steps 6000 --sched constant --lr 3e-3 --layers 4 \
#       --batch 512 --grid "seed=0;seed=1;seed=2;seed=3"
set -uo pipefail
OUT=${OUT:-bench-out}; RUNS=${RUNS:-/tmp/bz_quality}
SWEEPS=${SWEEPS:-"kv_policies_gpu:2 temf_gpu:4 membank_gpu:3"}
BUDGET=${BUDGET:-400}
mkdir -p "$OUT" "$RUNS"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
mkdir -p /tmp/bzpath && ln -sfn "$PWD" /tmp/bzpath/blockzoo && export PYTHONPATH=/tmp/bzpath:${PYTHONPATH:-}
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
for item in $SWEEPS; do
  name=${item%%:*}; workers=${item##*:}
  [ -f "examples/sweeps/$name.yaml" ] || { echo "no examples/sweeps/$name.yaml"; exit 2; }
  start=$(date +%s)
  timeout "$BUDGET" python3 -m blockzoo.cli sweep "examples/sweeps/$name.yaml" --device cuda --workers "$workers" \
    --out "$RUNS/$name" > "$RUNS/$name.log" 2>&1
  rc=$?
  python3 -m blockzoo.cli report "$RUNS/$name" > /dev/null 2>&1   # also after a timeout: finished trials
  mkdir -p "$OUT/$name"
  for f in report.md results.jsonl pareto.png retention.png; do
    [ -f "$RUNS/$name/$f" ] && cp "$RUNS/$name/$f" "$OUT/$name/"
  done
  tail -c 3000 "$RUNS/$name.log" > "$OUT/$name/log.txt"
  echo "$name: exit $rc ($([ $rc = 124 ] && echo 'time limit' || echo done)) in $(( $(date +%s) - start )) s"
done
