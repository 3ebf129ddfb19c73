#!/usr/bin/env bash
# Train with torchrun instead of accelerate launch (one node or several).
#
#   launchers/torchrun.sh configs/joint.yaml [key.sub=value ...] [--resume]
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launchers/torchrun.sh configs/joint.yaml    # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launchers/torchrun.sh configs/joint.yaml    # on node1
#
# Environment: NPROC_PER_NODE (default: number of GPUs, else 1), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), PYTHON (python).
# torchrun gives plain DDP: jetfm's Accelerator reads RANK/WORLD_SIZE/LOCAL_RANK from it.
# For FSDP2 or DeepSpeed use accelerate launch with configs/accelerate/*.yaml (or slurm.sh).
# On CPU-only machines export ACCELERATE_USE_CPU=1 (the trainer refuses to run N lone copies).
# SIGTERM or Ctrl-C: the trainers finish their step, write a checkpoint and exit 0 (resume with --resume).
set -euo pipefail

if [[ $# -lt 1 ]]; then
    sed -n '2,15p' "$0"
    exit 2
fi
CONFIG=$1
shift

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

if [[ "$NNODES" -gt 1 ]]; then
    RDZV=(--rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "jetfm-${RDZV_ID:-$MASTER_PORT}")
else
    RDZV=(--master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
fi

cd "$REPO"
# launch.py: a SIGTERM/SIGINT (repeated or not) makes the trainers checkpoint, and the launcher exit 0
exec "$PYTHON" launchers/launch.py torchrun \
    --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" "${RDZV[@]}" \
    jetfm/train.py --config "$CONFIG" "$@"
