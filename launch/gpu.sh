#!/usr/bin/env bash
# Train (and evaluate) on this machine's NVIDIA GPU(s): one process, every local GPU in the
# mesh (config.mesh.data=-1 takes them all).
#
#   bash launch/gpu.sh CONFIG WORKDIR [more dataseg.main flags]
#   bash launch/gpu.sh configs/demo.py workdirs/demo_gpu
#   bash launch/gpu.sh configs/coco_r50.py:batch=16 workdirs/coco_r50 --config.data_dir=$HOME/tensorflow_datasets
#   SETUP_ONLY=1 bash launch/gpu.sh          # only install (used by launch/slurm.sh)
#
# First run: creates .venv (launch/setup_env.sh), then replaces the CPU jaxlib with the CUDA 12
# wheels of the *pinned* jax version (`jax[cuda12]==<requirements.txt's jax>`, CUDA and cuDNN
# come as pip packages; needs an NVIDIA driver >= 525). A stamp file makes later runs skip it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CALLER_DIR="$PWD"  # setup_env.sh cd's to the repo: relative CONFIG/WORKDIR are the caller's.
source "$ROOT/launch/setup_env.sh"
JAX_VERSION="$(sed -n 's/^jax==//p' "$ROOT/requirements.txt")"
STAMP="$ROOT/.venv/.dataseg-cuda12-$JAX_VERSION"
if [ ! -f "$STAMP" ]; then
  echo "[gpu] installing jax[cuda12]==$JAX_VERSION into .venv"
  # The same lock as the CPU set-up (-c: nothing it pins may move), plus the CUDA plugin.
  python -m pip install -q -c "$ROOT/requirements.lock" "jax[cuda12]==$JAX_VERSION"
  touch "$STAMP"
fi
python -c 'import jax; d = jax.devices(); print(f"[gpu] {len(d)} device(s): {d[0].device_kind}")'
if [ -n "${SETUP_ONLY:-}" ]; then
  exit 0
fi
if [ $# -lt 2 ]; then
  sed -n '2,9p' "$0"
  exit 2
fi
absolute() { case "$1" in /*|*://*) echo "$1" ;; *) echo "$CALLER_DIR/$1" ;; esac; }
CONFIG="$(absolute "$1")"
WORKDIR="$(absolute "$2")"
shift 2
export JAX_PLATFORMS=cuda
# Let XLA take most of the GPU memory up front (default 75%); the input pipeline is on the CPU.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
exec python -m dataseg.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
