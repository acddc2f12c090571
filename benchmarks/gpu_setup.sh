# Sourced by the prepared GPU checks (gpu_check.sh, gpu_perf.sh), from the repo root: results folder
# (OUT, made absolute), elapsed-time echo `el`, the wheels of missing dependencies (WHEELS, default
# ./.whl) and the package itself installed without dependencies into the machine's python3 (a CUDA
# torch), and the GPU/torch versions in $OUT/gpu.txt.
OUT=${OUT:-gpu_results}; WHEELS=${WHEELS:-.whl}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "[t=$(( $(date +%s) - T0 ))s] $*"; }
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$WHEELS"/*.whl 2>&1 | tail -2
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, passion; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), torch.backends.cudnn.version())" | tee -a "$OUT/gpu.txt"
