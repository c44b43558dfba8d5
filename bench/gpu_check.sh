#!/usr/bin/env bash
# Run this first on a new GPU machine (one CUDA GPU, under 8 minutes): the CUDA tests, then every fast path's
# figure (train_gpt 124M tokens/s and MFU with torch.compile on and off, flash-attn vs SDPA, BD3-LM on the GPU,
# sft fsdp=true on one GPU, vLLM samples/s) into out/gpu_check/gpu_check.json.
#   bash bench/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "error: bench/gpu_check.sh needs a CUDA GPU (python bench/gpu_check.py smoke=true checks it on CPU)" >&2; exit 1; }
timeout 180 python -m pytest -q tests/test_cuda.py > "$OUT/test_cuda.txt" 2>&1
echo "tests/test_cuda.py: exit $? ($(tail -1 "$OUT/test_cuda.txt"))"
exec python bench/gpu_check.py out_dir="$OUT"
