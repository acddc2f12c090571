#!/usr/bin/env bash
# The prepared GPU speed check (issue 17, after batching), one call on a lent GPU machine, from the repo root:
#   bash benchmarks/gpu_perf.sh            (OUT=folder for the results, default ./gpu_results)
# Installs the package without dependencies into the machine's python3 (a CUDA torch); wheels of
# missing dependencies may be put in WHEELS (default ./.whl). Steps, each under its own timeout so a
# slow one cannot starve the rest: the CUDA tests, where a step's time goes (profile_step.py: device
# busy fraction, kernel launches, top kernels; fp32, bf16, bf16 channels-last), the PASSION/baseline
# matrix at 80^3 with four modalities, PASSION's checkpointing modes at 128^3, the host-side mask against
# the mask on the GPU, then torch.compile's first and steady steps.
set -u
cd "$(dirname "$0")/.."
source benchmarks/gpu_setup.sh
el tests
timeout "${T_TESTS:-110}" python3 -m pytest tests/test_cuda.py -o addopts="" -q -rfE -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/cuda_tests.txt"
el profile
(cd benchmarks && timeout "${T_PROFILE:-90}" python3 profile_step.py --device cuda --models rfnet mmformer m2ftrans \
  --objectives baseline passion --sizes 80 --precisions fp32 bf16 --channels-last off on --steps 5 --profiled 2 --top 10 \
  > "$OUT/profile_cuda.json" 2> "$OUT/profile_cuda.log"); tail -2 "$OUT/profile_cuda.log"
el train_step
(cd benchmarks && timeout "${T_STEP:-100}" python3 train_step.py --device cuda --models rfnet mmformer m2ftrans --sizes 80 128 \
  --steps 5 --warmup 2 --precisions fp32 bf16 > "$OUT/train_step_cuda.json" 2> "$OUT/train_step_cuda.log")
tail -2 "$OUT/train_step_cuda.log"
el checkpointing
# row-at-a-time checkpointing of per-row blocks (eighth session): each mode's peak memory and time at 128^3,
# one call per backbone so that a slow one leaves the others' JSON
# and `all` with the per-row blocks over all rows at once (--checkpoint-rows together: fewer, larger kernels)
for m in rfnet mmformer m2ftrans; do
  (cd benchmarks && timeout "${T_CKPT:-35}" python3 train_step.py --device cuda --models $m --objectives passion \
    --sizes 128 --activation-checkpointing off decoder all --steps 3 --warmup 1 --precisions fp32 \
    > "$OUT/checkpointing_cuda_$m.json" 2> "$OUT/checkpointing_cuda_$m.log"
   timeout "${T_CKPT_ROWS:-15}" python3 train_step.py --device cuda --models $m --objectives passion \
    --sizes 128 --activation-checkpointing all --checkpoint-rows together --steps 3 --warmup 1 --precisions fp32 \
    > "$OUT/checkpointing_cuda_${m}_together.json" 2>> "$OUT/checkpointing_cuda_$m.log")
  tail -1 "$OUT/checkpointing_cuda_$m.log"
done
el host_mask
# a step that never waits for the device (ninth session) against the same step with the mask on the GPU
(cd benchmarks && for flag in "" --mask-on-device; do timeout "${T_SYNC:-30}" python3 train_step.py --device cuda \
  --models rfnet mmformer m2ftrans --objectives baseline passion --sizes 80 --precisions fp32 --steps 5 --warmup 2 \
  $flag > "$OUT/sync_cuda${flag:+_mask_on_device}.json" 2>> "$OUT/sync_cuda.log"; done); tail -2 "$OUT/sync_cuda.log"
el compile
(cd benchmarks && timeout "${T_COMPILE:-60}" python3 train_step.py --device cuda --models rfnet --objectives baseline passion \
  --sizes 80 --precisions bf16 --compile --steps 5 --warmup 2 > "$OUT/compile_cuda.json" 2> "$OUT/compile_cuda.log")
tail -4 "$OUT/compile_cuda.log"
el done
