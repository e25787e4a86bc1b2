#!/usr/bin/env bash
# GPU check with dummy weights (see bench/gpu_check.py): for an NVIDIA machine that has PyTorch,
# transformers and nvidia-ml-py but no vLLM and no network. Run from the repository root:
#   bash bench/gpu_check.sh [OUT_DIR]        (on CPU: bash bench/gpu_check.sh OUT_DIR --tiny)
set -euo pipefail
PYTHON=${PYTHON:-python3}
out=${1:-${OUT:-.}}
shift || true
mkdir -p "$out"
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
fi
PYTHONUNBUFFERED=1 "$PYTHON" bench/gpu_check.py --out "$out/gpu_check.json" "$@" 2>&1 \
    | grep -v "^\s*$" | tee "$out/gpu_check.log"
