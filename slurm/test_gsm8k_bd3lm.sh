#!/bin/bash
# Quick check of the GSM8K BD3-LM pipeline on 1 GPU (or the CPU): 100 training steps, then ppl_eval,
# a few samples and GSM8K accuracy on 20 problems. Minutes; run from the repository root.
#   bash slurm/test_gsm8k_bd3lm.sh                 # BLOCK_SIZE=4 bash slurm/test_gsm8k_bd3lm.sh
set -euo pipefail
BLOCK_SIZE=${BLOCK_SIZE:-16}
OUT=${OUT_DIR:-out/test_gsm8k_bd3lm_bs$BLOCK_SIZE}
CONFIG=configs/gsm8k_bd3lm.yaml
COMMON=(block_size="$BLOCK_SIZE" model=small micro_batch_size=8 batch_size=8)
python train_bd3lm.py "$CONFIG" "${COMMON[@]}" max_steps=100 warmup_steps=10 val_interval=50 ckpt_interval=50 \
    log_interval=10 out_dir="$OUT" resume=latest
python train_bd3lm.py "$CONFIG" "${COMMON[@]}" mode=ppl_eval checkpoint="$OUT/latest" eval_batches=4 out_dir="$OUT/ppl"
python train_bd3lm.py "$CONFIG" "${COMMON[@]}" mode=sample checkpoint="$OUT/latest" num_samples=4 out_dir="$OUT/samples"
python eval_gsm8k.py model="$OUT/latest" task=gsm8k limit=20 out_dir="$OUT/gsm8k"
echo "done: $OUT"
