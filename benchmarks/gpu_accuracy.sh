#!/usr/bin/env bash
# The phantom accuracy benchmark (benchmarks/accuracy.py) on a lent GPU machine, one call, run from
# the repository root:
#   bash benchmarks/gpu_accuracy.sh "SEEDS" LABEL:ARGS [LABEL:ARGS ...]
#   e.g. bash benchmarks/gpu_accuracy.sh 1,2,3,4,5 "now:" "cases44:--cases 44 --set train.iters_per_epoch=17"
# Each recipe (LABEL:extra accuracy.py arguments) runs every seed in parallel, one process per seed
# and one CPU thread each, all recipes at once, on cuda; the recipe itself (epochs, lr, patch) is the
# demo's. OUT (default ./gpu_results) gets each recipe's JSON and log, and - also when the time runs out -
# every finished run's results.json and metrics.jsonl, so partial results come back.
# Installs the package without dependencies into the machine's python3 (which holds a CUDA torch);
# wheels of missing dependencies (nibabel, monai, nilearn) may be put in WHEELS (default ./.whl).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}; WHEELS=${WHEELS:-.whl}; BUDGET_S=${BUDGET_S:-450}
PY=${PY:-python3}; DEVICE=${DEVICE:-cuda}  # PY=.venv/bin/python DEVICE=cpu: a local dry run (no install)
SEEDS=$1; shift
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "[t=$(( $(date +%s) - T0 ))s] $*"; }
if [ "$DEVICE" = cuda ]; then
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$WHEELS"/*.whl 2>&1 | tail -2
  fi
  $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
fi
NJOBS=$(echo "$SEEDS" | tr ',' '\n' | grep -c .)
pids=()
for recipe in "$@"; do
  label=${recipe%%:*}; args=${recipe#*:}
  el "recipe $label: $args"
  # shellcheck disable=SC2086
  timeout "$BUDGET_S" $PY benchmarks/accuracy.py --out "runs/gpu_acc/$label" --seeds "$SEEDS" --jobs "$NJOBS" \
    --set train.device="$DEVICE" --set train.threads=1 $args > "$OUT/acc_$label.json" 2> "$OUT/acc_$label.log" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
pkill -f benchmarks/accuracy.py 2>/dev/null  # seeds still running when the time ran out
el "runs done or out of time; collecting"
for f in runs/gpu_acc/*/seed_*/*/eval/test/results.json runs/gpu_acc/*/seed_*/*/metrics.jsonl; do
  [ -f "$f" ] || continue
  rel=${f#runs/gpu_acc/}; cp "$f" "$OUT/${rel//\//__}"  # flat: the device tool brings back shallow folders only
done
for recipe in "$@"; do label=${recipe%%:*}; grep -E "^\[seed|Error|error" "$OUT/acc_$label.log" | tail -4; done
el done
