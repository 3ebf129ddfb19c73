#!/usr/bin/env bash
# One point of a pre-training scaling study per SLURM array task, each through launchers/slurm.sh.
#
#   jetfm sweep pretrain ... --runner slurm --out runs/scaling       # writes runs/scaling/slurm/points.txt, submits:
#   sbatch --array=0-11 --nodes 1 --gpus-per-node 8 --time 4:00:00 launchers/sweep_slurm.sh runs/scaling/slurm/points.txt
#   jetfm sweep pretrain ... --runner slurm --out runs/scaling       # again when the array is done: collect and fit
#
# points.txt holds one resolved config per line (runs/scaling/configs/<point>.yaml); task i trains
# line i with `launchers/slurm.sh CONFIG` (exec: its time-limit and pre-emption handling, requeue
# and --resume auto apply to the task unchanged; docs/SLURM.md). Settings: those of
# launchers/slurm.sh (JETFM_DIR, JETFM_ACTIVATE, ACCELERATE_CONFIG, GPUS_PER_NODE, ...).
# MLFLOW_TRACKING_URI: points on many nodes should log to a server, not to one sqlite file.
#SBATCH --job-name=jetfm-sweep
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
set -uo pipefail

if [[ $# -ne 1 ]]; then
    sed -n '2,13p' "$0"
    exit 2
fi
POINTS=$1
if [[ -z ${SLURM_ARRAY_TASK_ID:-} ]]; then
    echo "jetfm: not an array task (no SLURM_ARRAY_TASK_ID); submit with sbatch --array=0-N" >&2
    exit 2
fi
JETFM_DIR=${JETFM_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
export JETFM_DIR
cd "$JETFM_DIR" || exit 2
CONFIG=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$POINTS")
if [[ -z $CONFIG ]]; then
    echo "jetfm: $POINTS has no line $((SLURM_ARRAY_TASK_ID + 1)) for array task $SLURM_ARRAY_TASK_ID" >&2
    exit 2
fi
echo "jetfm: array task $SLURM_ARRAY_TASK_ID of job ${SLURM_ARRAY_JOB_ID:-?}: $CONFIG"
exec bash launchers/slurm.sh "$CONFIG"
