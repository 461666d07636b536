#!/usr/bin/env bash
# Multi-node GPU training under Slurm: one process per node, each driving all of its GPUs;
# the processes join with jax.distributed.initialize(), which dataseg.main calls by itself
# when SLURM_NTASKS > 1 (coordinator, process count and ids come from Slurm's variables).
#
#   sbatch launch/slurm.sh CONFIG WORKDIR [more dataseg.main flags]
#   sbatch --nodes=8 launch/slurm.sh configs/joint_r50.py /shared/runs/joint_r50 \
#       --config.data_dir=/shared/tensorflow_datasets
#   sbatch --nodes=2 --gpus-per-node=4 launch/slurm.sh configs/coco_r50.py:batch=16 /shared/runs/coco
#
# Needs the checkout (and its .venv) on a filesystem every node sees; the first job installs
# jax[cuda12] into .venv (launch/gpu.sh), so run `SETUP_ONLY=1 bash launch/gpu.sh` on a login
# node once beforehand when nodes have no internet. Resubmitting with the same WORKDIR resumes;
# Slurm's pre-emption SIGTERM (--signal) makes every process checkpoint and exit 0.
#
#SBATCH --job-name=dataseg
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@300
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,9p' "$0"
  exit 2
fi
CONFIG="$1"
WORKDIR="$2"
shift 2
# sbatch runs a copy of this script; SLURM_SUBMIT_DIR is where `sbatch` was called (the repo).
ROOT="${DATASEG_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
cd "$ROOT"
SETUP_ONLY=1 bash launch/gpu.sh
source .venv/bin/activate
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=2 JAX_PLATFORMS=cuda
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
echo "[slurm] $SLURM_JOB_NUM_NODES node(s) x ${SLURM_GPUS_PER_NODE:-?} GPU(s): $SLURM_JOB_NODELIST"
# One task per node (--ntasks-per-node=1); every process sees all of its node's GPUs.
# --kill-on-bad-exit: one failed process ends the step instead of hanging the others.
srun --kill-on-bad-exit=1 python -m dataseg.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
