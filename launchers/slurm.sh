#!/usr/bin/env bash
# Multi-node training on SLURM: one task per node, each running `accelerate launch` for its GPUs.
#
#   sbatch --nodes 4 --gpus-per-node 8 launchers/slurm.sh configs/joint.yaml [key.sub=value ...]
#   ACCELERATE_CONFIG=configs/accelerate/fsdp.yaml sbatch --nodes 4 launchers/slurm.sh configs/joint.yaml
#
# The run resumes from its latest checkpoint (--resume auto), so a requeued or resubmitted job
# continues where it stopped. SLURM sends SIGTERM 120 s before the time limit (--signal); the
# trainer then finishes its step, writes a checkpoint and exits cleanly. The launcher (torch
# elastic) kills workers 30 s after forwarding SIGTERM: models whose checkpoint takes longer
# rely on train.checkpoint_every.
# Environment: ACCELERATE_CONFIG (default configs/accelerate/multinode.yaml, i.e. DDP; use
# fsdp.yaml or deepspeed_zero2.yaml for those), GPUS_PER_NODE (default SLURM_GPUS_ON_NODE),
# MASTER_PORT (29500), MLFLOW_TRACKING_URI (a server: the default sqlite file is per-node).
#SBATCH --job-name=jetfm
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=runs/slurm-%j.out
set -euo pipefail

if [[ $# -lt 1 ]]; then
    sed -n '2,14p' "$0"
    exit 2
fi
CONFIG=$1
shift

REPO=${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
cd "$REPO"
export ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-configs/accelerate/multinode.yaml}
export GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
export NNODES=${SLURM_NNODES:-1}
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-29500}
export CONFIG
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

echo "jetfm: $NNODES nodes x $GPUS_PER_NODE GPUs, master $MASTER_ADDR:$MASTER_PORT, $ACCELERATE_CONFIG, $CONFIG $*"

# $SLURM_NODEID must be read on each node, hence the single quotes; `exec` makes the launcher
# the task srun signals, and it forwards SIGTERM to the training processes.
srun --kill-on-bad-exit=1 bash -c '
    exec accelerate launch \
        --config_file "$ACCELERATE_CONFIG" \
        --num_machines "$NNODES" \
        --num_processes $((NNODES * GPUS_PER_NODE)) \
        --machine_rank "$SLURM_NODEID" \
        --main_process_ip "$MASTER_ADDR" \
        --main_process_port "$MASTER_PORT" \
        --rdzv_backend c10d \
        jetfm/train.py --config "$CONFIG" --resume auto "$@"
' jetfm "$@"
