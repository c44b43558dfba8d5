#!/usr/bin/env bash
# End-to-end pipeline: text -> token shards -> pretraining -> HuggingFace export -> evaluation.
#
# With no arguments it runs the offline CPU demo on the built-in synthetic math corpus (a few minutes on a
# laptop; byte tokenizer, so it needs no files and no network):
#   bash slurm/pipeline.sh
# On a cluster, the same stages with the seed experiment's configs, one node with 4 GPUs:
#   sbatch --nodes=1 --gpus-per-node=4 --cpus-per-task=32 --time=48:00:00 slurm/pipeline.sh \
#       configs/data_fineweb_edu_10b.yaml configs/gpt2_124m_10b.yaml
# Every stage is resumable, so a rerun (or a requeued job) skips what is already done.
#
# Arguments: [DATA_CONFIG] [TRAIN_CONFIG]. Environment: NPROC (processes for train_gpt; default: the GPUs
# SLURM gave us, else 1), EVAL_ARGS (extra key=value for eval_gsm8k.py), TOKENIZER_FILE (GPT-2 ranks file for
# offline machines, passed to the stages that need it).
#SBATCH --job-name=pipeline
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"

DATA_CONFIG=${1:-configs/data_demo.yaml}
TRAIN_CONFIG=${2:-configs/demo.yaml}
NPROC=${NPROC:-${SLURM_GPUS_ON_NODE:-1}}
TOK_ARGS=()
[ -n "${TOKENIZER_FILE:-}" ] && TOK_ARGS=(tokenizer_file="$TOKENIZER_FILE")

# the run folder the training config writes to, read from the YAML the same way the script does
OUT_DIR=$(python -c "import sys, train_gpt, common; print(common.load_config(train_gpt.Config, [sys.argv[1]]).out_dir)" "$TRAIN_CONFIG")
RUN=$(basename "$OUT_DIR")

echo "== 1/4 prepare_data: $DATA_CONFIG"
python prepare_data.py "$DATA_CONFIG"

echo "== 2/4 train_gpt: $TRAIN_CONFIG on $NPROC process(es) -> $OUT_DIR"
if [ "$NPROC" -gt 1 ]; then
  torchrun --standalone --nproc_per_node="$NPROC" train_gpt.py "$TRAIN_CONFIG" resume=latest
else
  python train_gpt.py "$TRAIN_CONFIG" resume=latest
fi

echo "== 3/4 export_hf: $OUT_DIR/latest -> hf/$RUN (verified against the native logits)"
python export_hf.py --checkpoint "$OUT_DIR/latest" --output-dir "hf/$RUN" "${TOK_ARGS[@]}"

echo "== 4/4 eval_gsm8k: arithmetic probes of hf/$RUN"
python eval_gsm8k.py task=probes model="hf/$RUN" out_dir="out/eval/$RUN/probes" ${EVAL_ARGS:-}

echo "== done: training results in $OUT_DIR/results.json (curve: $OUT_DIR/loss.png), probe accuracy in out/eval/$RUN/probes/results.json"
