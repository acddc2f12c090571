#!/usr/bin/env bash
# The prepared GPU check (issue 17 item 4), one call on a lent GPU machine, run from the repo root:
#   bash benchmarks/gpu_check.sh            (OUT=folder for the results, default ./gpu_results)
# Installs the package without dependencies into the machine's python3 (which holds a CUDA torch);
# wheels of missing dependencies (nibabel, monai, nilearn) may be put in WHEELS (default ./.whl).
# Steps: CUDA tests, the train_step.py matrix on cuda, loader throughput, then the suite with
# whatever remains of BUDGET_S seconds.
set -u
cd "$(dirname "$0")/.."
BUDGET_S=${BUDGET_S:-510}
source benchmarks/gpu_setup.sh
el tests
timeout 150 python3 -m pytest tests/test_cuda.py -o addopts="" -q -rfE -p no:cacheprovider 2>&1 | tail -40 | tee "$OUT/cuda_tests.txt"
el train_step
timeout 200 python3 benchmarks/train_step.py --device cuda --models rfnet mmformer m2ftrans --sizes 80 128 \
  --steps 5 --warmup 2 --precisions fp32 bf16 > "$OUT/train_step_cuda.json" 2> "$OUT/train_step_cuda.log"
tail -3 "$OUT/train_step_cuda.log"
el loader
timeout 110 python3 benchmarks/loader.py --cases 16 --shape 160 160 128 --patch 80 --workers 0 4 8 \
  --samples 96 > "$OUT/loader.json" 2> "$OUT/loader.log"; tail -4 "$OUT/loader.log"
LEFT=$(( BUDGET_S - ($(date +%s) - T0) )); el "suite gets ${LEFT}s"
[ "$LEFT" -gt 20 ] && timeout "$LEFT" python3 -m pytest tests -o addopts="" -q -rfE -n 14 -p no:cacheprovider 2>&1 \
  | tail -30 | tee "$OUT/suite_on_gpu_host.txt"
el done
