#!/usr/bin/env bash
# Multi-node training on SLURM: one task per node, each running `accelerate launch` for its GPUs.
#
#   sbatch --nodes 4 --gpus-per-node 8 --time 24:00:00 launchers/slurm.sh configs/joint.yaml [key.sub=value ...]
#   JETFM_DIR=$HOME/jetfm JETFM_ACTIVATE="source $HOME/jetfm/.venv/bin/activate" sbatch ... launchers/slurm.sh ...
#
# Stops and restarts (docs/SLURM.md): the trainer always starts with --resume auto.
#  - time limit: SLURM sends USR1 to this script 300 s before it (--signal=B:USR1@300; give more
#    with `sbatch --signal=B:USR1@600` if a step plus a checkpoint takes longer). The script sends
#    SIGTERM to the training step, every process finishes its step, writes the checkpoint and
#    exits 0, then the script requeues the job (scontrol requeue) and the requeued job resumes.
#  - pre-emption, scancel: SLURM sends SIGTERM to every process; the same clean stop (a
#    pre-empted job is requeued by SLURM itself, --requeue). Repeated signals are absorbed until
#    the checkpoint is written; the grace period (GraceTime / KillWait) must cover one step and
#    one checkpoint.
# Settings (environment variables, exported by sbatch to the job):
#   JETFM_DIR          the jetfm checkout to run in (default: the directory sbatch was called from)
#   JETFM_ACTIVATE     shell code run on every node before training (default: none, i.e. the
#                      environment sbatch was called from), e.g. "source .venv/bin/activate" or
#                      "module load cuda/12.4 && conda activate jetfm"
#   PYTHON             (python) the interpreter after activation
#   ACCELERATE_CONFIG  (configs/accelerate/multinode.yaml, i.e. DDP; or fsdp.yaml, deepspeed_zero2.yaml)
#   GPUS_PER_NODE      (SLURM_GPUS_ON_NODE, else 8)
#   MASTER_PORT        (20000 + job id mod 20000: jobs sharing a node do not collide)
#   MLFLOW_TRACKING_URI  a server for multi-node runs (the default sqlite file lives on one disk)
#SBATCH --job-name=jetfm
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm-%j.out
set -uo pipefail

if [[ $# -lt 1 ]]; then
    sed -n '2,28p' "$0"
    exit 2
fi
CONFIG=$1
shift

# sbatch runs a copy of this script from a spool directory: the checkout comes from the settings
JETFM_DIR=${JETFM_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
if [[ ! -f "$JETFM_DIR/jetfm/train.py" ]]; then
    echo "jetfm: JETFM_DIR=$JETFM_DIR is not a jetfm checkout (no jetfm/train.py); set JETFM_DIR" >&2
    exit 2
fi
cd "$JETFM_DIR" || exit 2
export JETFM_DIR JETFM_ACTIVATE=${JETFM_ACTIVATE:-} PYTHON=${PYTHON:-python}
export ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-configs/accelerate/multinode.yaml}
export GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
export NNODES=${SLURM_NNODES:-1}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
export CONFIG
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

echo "jetfm: job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) in $JETFM_DIR: $NNODES nodes x" \
     "$GPUS_PER_NODE GPUs, master $MASTER_ADDR:$MASTER_PORT, $ACCELERATE_CONFIG, $CONFIG $*"

# A signal interrupts `wait`; the handlers note why, the loop below keeps waiting for the step.
stop_reason=""
on_time_limit() {
    stop_reason=time-limit
    echo "jetfm: time limit near: SIGTERM to the training step; it checkpoints, then the job is requeued" >&2
    scancel --signal=TERM "$SLURM_JOB_ID"  # every process of the job's steps, not this script
}
on_stop() {
    [[ -n $stop_reason ]] || stop_reason=$1
    echo "jetfm: $1: the training processes finish their step and checkpoint" >&2
}
trap on_time_limit USR1
trap 'on_stop SIGTERM' TERM
trap 'on_stop SIGINT' INT

# $SLURM_NODEID must be read on each node, hence the single quotes; `exec` makes the launcher the
# task srun starts; launchers/launch.py forwards a stop to the trainers and absorbs repeats.
srun --kill-on-bad-exit=1 bash -c '
    if [[ -n "$JETFM_ACTIVATE" ]]; then eval "$JETFM_ACTIVATE" || exit 2; fi
    exec "$PYTHON" launchers/launch.py accelerate \
        --config_file "$ACCELERATE_CONFIG" \
        --num_machines "$NNODES" \
        --num_processes $((NNODES * GPUS_PER_NODE)) \
        --machine_rank "$SLURM_NODEID" \
        --main_process_ip "$MASTER_ADDR" \
        --main_process_port "$MASTER_PORT" \
        --rdzv_backend c10d \
        jetfm/train.py --config "$CONFIG" --resume auto "$@"
' jetfm "$@" &
step=$!
rc=0
wait "$step" || rc=$?
while kill -0 "$step" 2>/dev/null; do  # woken by a signal: the step is still stopping
    rc=0
    wait "$step" || rc=$?
done

if [[ $stop_reason == time-limit ]]; then
    if [[ $rc -eq 0 ]]; then
        echo "jetfm: checkpoint written; requeueing job $SLURM_JOB_ID, which resumes from it" >&2
        scontrol requeue "$SLURM_JOB_ID"
    else
        echo "jetfm: the training step exited $rc after the time-limit signal; not requeued" >&2
    fi
fi
exit "$rc"
