#!/usr/bin/env bash
# The whole experiment in one command: for every condition (baseline, mul_tokens) the token shards, GPT
# pretraining, the HF export, SFT (one stage after another: Tulu, then GSM8K), GRPO, and the evaluations after
# each (GSM8K, arithmetic probes, HellaSwag, and the sweep over the pretraining checkpoints); then the report
# comparing the conditions (eval_gsm8k.py task=compare: comparison_report.json and comparison.png).
#
#   bash slurm/pipeline.sh                                   # the offline CPU demo: configs/demo/
#   sbatch slurm/pipeline.sh configs/gpt2_124m_10b           # the seed's experiment, one node of 4 GPUs
#   bash slurm/pipeline.sh configs/gpt2_124m_10b --skip-data --conditions mul_tokens
#   bash slurm/pipeline.sh --dry-run                         # print what would run, run nothing
#   bash slurm/pipeline.sh configs/gpt2_124m_10b --check     # only check every stage's inputs (seconds)
#
# CONFIG_DIR/pipeline.env names each stage's config (read it: it is the experiment's table of contents).
# Options: --skip-data --skip-pretrain --skip-sft --skip-rl (--rl: GRPO where pipeline.env has it off)
#   --skip-eval --conditions baseline,mul_tokens --seeds 1337,1338 (one pretraining run per seed, each with its
#   own later stages under OUT/<condition>/seed<N>/, pooled in the report; default: the config's seed)
#   --jobs N (runs, i.e. conditions x seeds, side by side after the data; default: the CPU cores on a machine
#   without GPUs, 1 with GPUs; the report waits for all) --out DIR (default out/<experiment>)
#   --data DIR (default data/<experiment>) --dry-run --check --no-check
# Environment: NPROC (processes per training stage; default: the GPUs SLURM gave us, else those nvidia-smi
#   lists, else 1), EVAL_ARGS (extra key=value for every evaluation).
#
# Before the first stage, the preflight (slurm/preflight.py) checks the inputs of every stage about to run, dry:
# the files the configs name, the HF hub sources (or, offline, the local caches), the GPT-2 ranks (tokenizer_file
# or tiktoken's cache) and the outputs earlier stages leave; whatever is missing stops the launch in seconds with
# one message naming each missing input and the local file to pass instead (--check: only that; --no-check: skip it).
#
# A stage whose outputs are complete is skipped, so a rerun after a failure (or a requeued job) continues
# where it broke, and a second run runs nothing. Each stage's command is printed before it runs, to rerun
# one by hand. Training stages resume from their newest checkpoint (resume=latest). Under SLURM, USR1 (sent
# before the time limit, --signal below) or SIGTERM makes the running stage checkpoint and exit, and the job
# requeues itself.
#SBATCH --job-name=pipeline
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --mem=256G
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"

CONFIG_DIR=configs/demo
OUT_ROOT="" DATA_ROOT="" CONDITIONS_ARG="" RL_ARG="" SEEDS_ARG="" JOBS_ARG=""
SKIP_DATA=0 SKIP_PRETRAIN=0 SKIP_SFT=0 SKIP_EVAL=0 DRY_RUN=0 CHECK=1 CHECK_ONLY=0 COLLECT=""
die() { echo "error: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
    case "$1" in
        --skip-data) SKIP_DATA=1 ;;
        --skip-pretrain) SKIP_PRETRAIN=1 ;;
        --skip-sft) SKIP_SFT=1 ;;
        --skip-rl) RL_ARG=0 ;;
        --rl) RL_ARG=1 ;;
        --skip-eval) SKIP_EVAL=1 ;;
        --conditions) [ $# -ge 2 ] || die "--conditions needs a value"; CONDITIONS_ARG=$2; shift ;;
        --conditions=*) CONDITIONS_ARG=${1#*=} ;;
        --seeds) [ $# -ge 2 ] || die "--seeds needs a value"; SEEDS_ARG=$2; shift ;;
        --seeds=*) SEEDS_ARG=${1#*=} ;;
        --out) [ $# -ge 2 ] || die "--out needs a value"; OUT_ROOT=$2; shift ;;
        --data) [ $# -ge 2 ] || die "--data needs a value"; DATA_ROOT=$2; shift ;;
        --jobs) [ $# -ge 2 ] || die "--jobs needs a value"; JOBS_ARG=$2; shift ;;
        --jobs=*) JOBS_ARG=${1#*=} ;;
        --dry-run) DRY_RUN=1 ;;
        --check) CHECK_ONLY=1 ;;
        --no-check) CHECK=0 ;;
        -h | --help) sed -n '2,/^#SBATCH/p' "$0" | grep -v '^#SBATCH' | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) CONFIG_DIR=${1%/} ;;
    esac
    shift
done
[ -f "$CONFIG_DIR/pipeline.env" ] || die "$CONFIG_DIR/pipeline.env not found (an experiment folder such as configs/demo)"
# shellcheck source=/dev/null
source "$CONFIG_DIR/pipeline.env"
EXP=$(basename "$CONFIG_DIR")
OUT_ROOT=${OUT_ROOT:-out/$EXP}
DATA_ROOT=${DATA_ROOT:-data/$EXP}
CONDITIONS=${CONDITIONS_ARG:-$CONDITIONS}
CONDITIONS=${CONDITIONS//,/ }
RL=${RL_ARG:-$RL}
SEEDS=${SEEDS_ARG:-${SEEDS:-}}
SEEDS=${SEEDS//,/ }
for COND in $CONDITIONS; do
    DATA_VAR=DATA_$COND
    [ -n "${!DATA_VAR:-}" ] || die "unknown condition '$COND': $CONFIG_DIR/pipeline.env has no $DATA_VAR"
done

visible_gpus() {
    local n=0
    command -v nvidia-smi >/dev/null && n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    echo "${n:-0}"
}
GPUS=${SLURM_GPUS_ON_NODE:-$(visible_gpus)}
NPROC=${NPROC:-$((GPUS > 0 ? GPUS : 1))}
[ "$NPROC" -ge 1 ] || NPROC=1
# runs side by side: on a CPU machine one per core (each stage of the demo is one thread), on GPUs one at a
# time (each training stage takes every GPU); a dry run prints in order
JOBS=${JOBS_ARG:-$( [ "$GPUS" -gt 0 ] && echo 1 || env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 1)}  # (nproc obeys OMP_NUM_THREADS)
[[ "$JOBS" =~ ^[1-9][0-9]*$ ]] || die "--jobs needs a whole number of at least 1, got '$JOBS'"
[ "$DRY_RUN" = 0 ] || JOBS=1
LAUNCH=(python)
[ "$NPROC" -gt 1 ] && LAUNCH=(torchrun --standalone --nproc_per_node="$NPROC")

# ---- preemption: pass the signal to the running stage (it checkpoints and exits 0), then requeue
CHILD="" STOPPING=0 UNIT_PIDS=() UNIT_NAMES=() IN_UNIT=0 STOPPED=3  # STOPPED: a unit's status when signalled
on_signal() {
    echo "$(date) $1: asking the running stage to checkpoint and exit"
    STOPPING=1
    [ -n "$CHILD" ] && kill -TERM "$CHILD" 2>/dev/null || true  # torchrun passes SIGTERM on to its workers
    for PID in "${UNIT_PIDS[@]}"; do kill -TERM "$PID" 2>/dev/null || true; done  # each unit passes it on
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
stop_here() {
    [ "$IN_UNIT" = 0 ] || exit "$STOPPED"
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        echo "$(date) requeueing job $SLURM_JOB_ID; it continues from the stage that was stopped"
        scontrol requeue "$SLURM_JOB_ID"
    else
        echo "$(date) stopped; run the same command again to continue"
    fi
    exit 0
}

# complete FILE [TEXT]: FILE exists (every stage writes its last output atomically) and holds TEXT
complete() { [ -e "$1" ] && { [ -z "${2:-}" ] || grep -qF "$2" "$1"; }; }

# stage NAME DONE_FILE DONE_TEXT COMMAND...: run COMMAND unless the stage is complete; afterwards it must be
# (a training run stopped by a signal exits 0 without finishing: then the pipeline stops here)
stage() {
    local name=$1 done_file=$2 done_text=$3
    shift 3
    if complete "$done_file" "$done_text"; then
        echo "== $name: complete ($done_file), skipped"
        return 0
    fi
    if [ -n "$COLLECT" ]; then  # the preflight's pass: note the stage and its command, one record each
        printf '%s\0' "$name" "$@" $'\x1e' >> "$COLLECT"
        return 0
    fi
    echo "== $name"
    echo "+ $*"
    [ "$DRY_RUN" = 1 ] && return 0
    local t0=$SECONDS cpu0
    child_cpu
    cpu0=$CPU
    "$@" &
    CHILD=$!
    local status=0
    wait "$CHILD" || status=$?
    while kill -0 "$CHILD" 2>/dev/null; do  # a trapped signal ends `wait` early: wait for the stage itself
        status=0
        wait "$CHILD" || status=$?
    done
    CHILD=""
    [ "$STOPPING" = 1 ] && stop_here
    [ "$status" = 0 ] || die "$name failed with status $status (the command is above; fix and rerun)"
    complete "$done_file" "$done_text" || die "$name exited without writing $done_file"
    child_cpu
    echo "== $name: done in $((SECONDS - t0)) s, $(awk "BEGIN { printf \"%.0f\", $CPU - $cpu0 }") s CPU"
}

# child_cpu: CPU = the seconds of CPU (user + system) this shell's finished children used so far (bash's
# `times`, which must run in this shell itself, not in a $(...) subshell)
child_cpu() {
    local file=${TMPDIR:-/tmp}/pipeline-times.$BASHPID
    times > "$file"
    CPU=$(awk 'NR == 2 { gsub(/s/, ""); split($1, u, "m"); split($2, k, "m"); print u[1] * 60 + u[2] + k[1] * 60 + k[2] }' "$file")
    rm -f "$file"
}

# which tasks this checkout's eval_gsm8k.py knows (its TASKS tuple), so a config may name newer ones
eval_knows() { grep -qE "^TASKS = .*\"$1\"" eval_gsm8k.py; }

LIST() { local IFS=,; echo "[$*]"; }  # words -> [a,b,c], a list for key=value

# evaluate STAGE MODEL CONFIG TASKS...: one results folder per task under $EVAL/STAGE/
evaluate() {
    local at=$1 model=$2 config=$3
    shift 3
    for TASK in "$@"; do
        if ! eval_knows "$TASK"; then
            echo "== eval $at/$TASK $U: eval_gsm8k.py has no task '$TASK' in this checkout, skipped"
            continue
        fi
        # shellcheck disable=SC2086  # EVAL_ARGS: several key=value
        stage "eval $at/$TASK $U" "$EVAL/$at/$TASK/results.json" "" \
            python eval_gsm8k.py "$config" ${EVAL_ARGS:-} model="$model" out_dir="$EVAL/$at/$TASK" task="$TASK"
    done
}

echo "$(date) pipeline $CONFIG_DIR: conditions [$CONDITIONS], out $OUT_ROOT, data $DATA_ROOT, $NPROC process(es)" \
     "per training stage, --jobs $JOBS, job ${SLURM_JOB_ID:-none} (restart ${SLURM_RESTART_COUNT:-0})"
[ -f sft.py ] || echo "== sft.py is not in this checkout yet: the SFT stages are skipped"
[ -f grpo.py ] || echo "== grpo.py is not in this checkout yet: the GRPO stage is skipped"

# unit_dir COND SEED: the folder of one pretraining run and everything after it
unit_dir() { if [ "$2" = config ]; then echo "$OUT_ROOT/$1"; else echo "$OUT_ROOT/$1/seed$2"; fi; }

# run_unit COND SEED: one condition's (and seed's) pretraining, export, SFT, GRPO and evaluations. It runs in a
# subshell of its own, beside the other units when --jobs allows: a signal reaches its running stage through
# the traps below, and a unit stopped so exits with status $STOPPED.
run_unit() {
    local COND=$1 SEED=$2
    trap 'on_signal USR1' USR1
    trap 'on_signal TERM' TERM
    UNIT_PIDS=() IN_UNIT=1
    local DATA=$DATA_ROOT/$COND COND_ARGS_VAR=SFT_ARGS_$COND UNIT U=$COND SEED_ARGS=()
    UNIT=$(unit_dir "$COND" "$SEED")
    if [ "$SEED" != config ]; then U="$COND seed$SEED" SEED_ARGS=(seed="$SEED"); fi
    local RUN=$UNIT/pretrain HF=$UNIT/hf EVAL=$UNIT/eval

    if [ "$SKIP_PRETRAIN" = 0 ]; then
        stage "train_gpt $U" "$RUN/results.json" '"status": "done"' "${LAUNCH[@]}" train_gpt.py "$PRETRAIN" \
            data_dir="$DATA" out_dir="$RUN" "${SEED_ARGS[@]}" resume=latest
        stage "export_hf $U" "$HF/config.json" "" python export_hf.py checkpoint="$RUN/latest" output_dir="$HF"
    fi

    local MODEL=$HF  # the model each later stage starts from: the last one finished
    if [ "$SKIP_SFT" = 0 ] && [ -f sft.py ]; then
        for SFT_CONFIG in $SFT_CONFIGS; do
            NAME=$(basename "$SFT_CONFIG" .yaml)
            # shellcheck disable=SC2086  # SFT_ARGS_<condition>: several key=value
            stage "$NAME $U" "$UNIT/$NAME/hf/config.json" "" "${LAUNCH[@]}" sft.py "$SFT_CONFIG" \
                ${!COND_ARGS_VAR:-} model="$MODEL" out_dir="$UNIT/$NAME" resume=latest
            MODEL=$UNIT/$NAME/hf
        done
    fi
    local SFT_MODEL=$MODEL
    if [ "$RL" = 1 ] && [ -f grpo.py ]; then
        if [ "$MODEL" = "$HF" ]; then
            echo "== grpo $U: no SFT stage before it (GRPO starts from an SFT model), skipped"
        else
            stage "grpo $U" "$UNIT/grpo/hf/config.json" "" "${LAUNCH[@]}" grpo.py "$GRPO_CONFIG" model="$MODEL" \
                out_dir="$UNIT/grpo" resume=latest
            MODEL=$UNIT/grpo/hf
        fi
    fi

    if [ "$SKIP_EVAL" = 0 ]; then
        if [ -e "$HF/config.json" ] || [ "$DRY_RUN" = 1 ]; then
            # shellcheck disable=SC2086
            evaluate pretrain "$HF" "$EVAL_BASE" $BASE_TASKS
            KNOWN=()
            for TASK in $SWEEP_TASKS; do eval_knows "$TASK" && KNOWN+=("$TASK"); done
            # shellcheck disable=SC2086
            stage "sweep $U" "$EVAL/sweep/checkpoint_results.json" "" python eval_gsm8k.py "$EVAL_SWEEP" \
                ${EVAL_ARGS:-} model="$RUN" out_dir="$EVAL/sweep" sweep_tasks="$(LIST "${KNOWN[@]}")"
        fi
        # shellcheck disable=SC2086
        if [ "$SFT_MODEL" != "$HF" ]; then evaluate sft "$SFT_MODEL" "$EVAL_CHAT" $CHAT_TASKS; fi
        # shellcheck disable=SC2086
        if [ "$MODEL" != "$SFT_MODEL" ]; then evaluate grpo "$MODEL" "$EVAL_CHAT" $CHAT_TASKS; fi
    fi
}

# wait_units: wait for the units started (UNIT_PIDS, named in UNIT_NAMES); note which failed or were stopped
wait_units() {
    local i status
    for i in "${!UNIT_PIDS[@]}"; do
        status=0
        wait "${UNIT_PIDS[$i]}" || status=$?
        while kill -0 "${UNIT_PIDS[$i]}" 2>/dev/null; do  # a trapped signal ends `wait` early
            status=0
            wait "${UNIT_PIDS[$i]}" || status=$?
        done
        if [ "$status" = "$STOPPED" ]; then STOPPING=1
        elif [ "$status" != 0 ]; then FAILED+=("${UNIT_NAMES[$i]}"); fi
    done
    UNIT_PIDS=() UNIT_NAMES=()
}

# walk: every stage of the launch, in order (what a dry run prints, and the plan the preflight checks)
walk() {
    RUNS=() TRAIN_RUNS=() LABELS=() UNITS=()  # for the report: one entry per condition and seed
    for COND in $CONDITIONS; do
        DATA_VAR=DATA_$COND
        echo "==== condition $COND"
        [ "$SKIP_DATA" = 1 ] || stage "prepare_data $COND" "$DATA_ROOT/$COND/meta.json" "" \
            python prepare_data.py "${!DATA_VAR}" out_dir="$DATA_ROOT/$COND"
        for SEED in ${SEEDS:-config}; do  # pretraining seeds: the same data, one run (and its later stages) each
            UNITS+=("$COND $SEED")
            RUNS+=("$(unit_dir "$COND" "$SEED")/eval") LABELS+=("$COND")
            TRAIN_RUNS+=("$(unit_dir "$COND" "$SEED")/pretrain")
        done
    done

    # the units, JOBS at a time; side by side, each line of a unit's output starts with its name
    FAILED=()
    CONCURRENT=$((JOBS < ${#UNITS[@]} ? JOBS : ${#UNITS[@]}))
    [ "$CONCURRENT" -gt 1 ] && echo "== ${#UNITS[@]} runs (condition x seed), $CONCURRENT at a time (--jobs $JOBS)"
    for UNIT_ARGS in "${UNITS[@]}"; do
        # shellcheck disable=SC2086  # "COND SEED"
        set -- $UNIT_ARGS
        NAME=$1; [ "$2" = config ] || NAME="$1 seed$2"
        if [ "$CONCURRENT" -gt 1 ]; then
            ( run_unit "$1" "$2" ) > >(sed -u "s/^/[$NAME] /") 2>&1 &
        else
            ( run_unit "$1" "$2" ) &
        fi
        UNIT_PIDS+=($!) UNIT_NAMES+=("$NAME")
        [ "${#UNIT_PIDS[@]}" -lt "$CONCURRENT" ] || wait_units
        [ "$STOPPING" = 0 ] || break
    done
    wait_units
    [ "$STOPPING" = 0 ] || stop_here
    [ "${#FAILED[@]}" = 0 ] ||
        die "${FAILED[*]} failed (the error is above; fix it and rerun: finished stages are skipped)"

    # ---- the report: every condition against the first (seeds pooled); redone when an evaluation is newer
    set -- $CONDITIONS
    if [ "$SKIP_EVAL" = 0 ] && [ $# -ge 2 ]; then
        REPORT=$OUT_ROOT/compare/comparison_report.json
        if [ -e "$REPORT" ] && [ -n "$(find "${RUNS[@]}" -name results.json -newer "$REPORT" 2>/dev/null | head -n 1)" ]; then
            [ "$DRY_RUN" = 1 ] || rm "$REPORT"  # out of date
        fi
        stage "compare $*" "$REPORT" "" python eval_gsm8k.py task=compare runs="$(LIST "${RUNS[@]}")" \
            labels="$(LIST "${LABELS[@]}")" train_runs="$(LIST "${TRAIN_RUNS[@]}")" out_dir="$OUT_ROOT/compare"
        [ "$DRY_RUN" = 1 ] || echo "== report: $REPORT and $OUT_ROOT/compare/comparison.png"
    fi
}

# preflight: the inputs of every stage about to run, checked before the first one (slurm/preflight.py); the walk
# in dry-run mode notes each stage's command (COLLECT) instead of printing it
preflight() {
    local plan status=0
    plan=$(mktemp "${TMPDIR:-/tmp}/pipeline-plan.XXXXXX")
    ( DRY_RUN=1 JOBS=1 COLLECT=$plan; walk ) > /dev/null || status=$?
    if [ "$status" = 0 ]; then python slurm/preflight.py "$plan" || status=$?; fi
    rm -f "$plan"
    return "$status"
}

if [ "$CHECK_ONLY" = 1 ]; then
    STATUS=0
    preflight || STATUS=$?
    exit "$STATUS"
fi
if [ "$CHECK" = 1 ] && [ "$DRY_RUN" = 0 ]; then
    preflight || exit 1  # its message names what is missing
    [ "$STOPPING" = 0 ] || stop_here
fi
walk
echo "$(date) pipeline done in $((SECONDS / 60)) min $((SECONDS % 60)) s (load average now: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo ?))"
