#!/usr/bin/env bash
# GPU check: the tests marked `gpu`, then the GPU benchmarks (threshold, strategy cost,
# step time at ~1.2B parameters in bf16), each under its own time limit so the whole run stays under
# 8 minutes on one GPU; prints a summary at the end. Outputs go to $OUT_DIR (default gpu_check_out/).
#
#   bash scripts/gpu_check.sh                 # from the repository root, in the project's environment
#   PYTHON=.venv/bin/python OUT_DIR=/tmp/gpu bash scripts/gpu_check.sh
#
# ZeRO (DeepSpeed) is not run here: it needs the deepspeed integration and a launcher.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT_DIR:-gpu_check_out}
mkdir -p "$OUT"
start=$(date +%s)

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to $PY; nothing to do" >&2
    exit 2
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"; } > "$OUT/device.txt"

run() {  # name, seconds, command...
    local name=$1 limit=$2; shift 2
    local t0=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "$name rc=$rc $(( $(date +%s) - t0 ))s" >> "$OUT/status.txt"
}
: > "$OUT/status.txt"
run tests 200 $PY -m pytest -q -m gpu tests/test_gpu.py -rs -p no:cacheprovider
run threshold 60 $PY benchmarks/threshold.py --device cuda --sizes 1e7 1e8 --dtypes float32 bfloat16 \
    --methods gmt_plugins kthvalue topk sort
run strategy_cost 130 $PY benchmarks/strategy_cost.py --device cuda --model 1b --dtype bfloat16 --repeats 3
run strategy_cost_135m 40 $PY benchmarks/strategy_cost.py --device cuda --model 135m --repeats 3 --rows gmt:tensor gmt:global random:tensor
run device_path 40 $PY benchmarks/device_path.py --device cuda --layers 30 --embeddings --repeats 3 --dtypes bfloat16
run step_time 90 $PY benchmarks/step_time.py --device cuda --model 1b --dtype bfloat16 --seq 1024 --micro-batch 4 --rounds 3

echo "================ gpu_check summary ($(( $(date +%s) - start )) s) ================"
cat "$OUT/device.txt"
cat "$OUT/status.txt"
echo "--- tests";          tail -n 15 "$OUT/tests.txt"
echo "--- threshold";      tail -n 20 "$OUT/threshold.txt"
echo "--- strategy cost (1b, bf16)"; tail -n 20 "$OUT/strategy_cost.txt"
echo "--- strategy cost (135m, fp32)"; tail -n 8 "$OUT/strategy_cost_135m.txt"
echo "--- gmt device path vs host path (135m, one sync per step vs per tensor)"; tail -n 10 "$OUT/device_path.txt"
echo "--- step time";      tail -n 15 "$OUT/step_time.txt"
