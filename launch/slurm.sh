#!/usr/bin/env bash
# Multi-node GPU training under Slurm: one process per node, each driving all of its GPUs;
# the processes join with jax.distributed.initialize(), which dataseg.main calls by itself
# when SLURM_NTASKS > 1 (coordinator, process count and ids come from Slurm's variables).
# jax alone would give each Slurm task only GPU number SLURM_LOCALID; dataseg.main passes
# local_device_ids=[] (every GPU of the node) for one task per node, and each task's share
# when several unbound tasks share a node (dataseg/main.py: slurm_local_device_ids). Every
# process prints "process i/n: k local device(s) (...), N in all" at start.
#
#   sbatch launch/slurm.sh CONFIG WORKDIR [more dataseg.main flags]
#   sbatch --nodes=8 launch/slurm.sh configs/joint_r50.py /shared/runs/joint_r50 \
#       --config.data_dir=/shared/tensorflow_datasets
#   sbatch --nodes=2 --gpus-per-node=4 launch/slurm.sh configs/coco_r50.py:batch=16 /shared/runs/coco
#
# Needs the checkout (and its .venv) on a filesystem every node sees; the first job installs
# jax[cuda12] into .venv (launch/gpu.sh), so run `SETUP_ONLY=1 bash launch/gpu.sh` on a login
# node once beforehand when nodes have no internet (concurrent jobs take a lock around the
# install). Resubmitting with the same WORKDIR resumes. Pre-emption and the time limit:
# --signal=TERM@300 sends SIGTERM to the tasks 300 s before the end; processes need not be
# signalled together: every step the processes reduce their SIGTERM flags, all save the
# same step (with every process's data position) and exit 0. CONFIG and WORKDIR may be
# relative to where you call sbatch.
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
absolute() {  # a path relative to the submit directory (kept: absolute paths, gs://...).
  case "$1" in /*|*://*) echo "$1" ;; *) echo "${SLURM_SUBMIT_DIR:-$PWD}/$1" ;; esac
}
CONFIG="$(absolute "$1")"
WORKDIR="$(absolute "$2")"
shift 2
# sbatch runs a copy of this script; SLURM_SUBMIT_DIR is where `sbatch` was called (the repo).
ROOT="${DATASEG_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
cd "$ROOT"
# One install at a time into the shared .venv (two jobs starting together would both pip).
if command -v flock >/dev/null; then
  mkdir -p .venv
  flock .venv/.setup.lock env SETUP_ONLY=1 bash launch/gpu.sh
else
  SETUP_ONLY=1 bash launch/gpu.sh
fi
source .venv/bin/activate
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=2 JAX_PLATFORMS=cuda
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
echo "[slurm] $SLURM_JOB_NUM_NODES node(s) x ${SLURM_GPUS_PER_NODE:-?} GPU(s): $SLURM_JOB_NODELIST"
# One task per node (--ntasks-per-node=1); every process drives all of its node's GPUs.
# srun no longer inherits --cpus-per-task from sbatch (Slurm >= 22.05): pass it on.
# --kill-on-bad-exit: one failed process ends the step instead of hanging the others.
srun --kill-on-bad-exit=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
    python -m dataseg.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
