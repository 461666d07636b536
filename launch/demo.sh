#!/usr/bin/env bash
# The README's main command: set-up, then DaTaSeg's joint training on the embedded synthetic
# suite (configs/demo.py), evaluation of every dataset in every task it supports, overlay
# PNGs and one results table. Running it again resumes (or reuses a finished run).
#
#   bash launch/demo.sh                       # workdir: workdirs/demo
#   WORKDIR=/tmp/d CONFIG_ARGS=steps=300 bash launch/demo.sh
#   bash launch/demo.sh --config.total_steps=500   # extra flags go to dataseg.main
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
WORKDIR="${WORKDIR:-workdirs/demo}"
CONFIG_ARGS="${CONFIG_ARGS:-}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
echo "[demo] workdir: $WORKDIR (TensorBoard: tensorboard --logdir $WORKDIR)"
start=$(date +%s)
python -m dataseg.main --config="configs/demo.py${CONFIG_ARGS:+:$CONFIG_ARGS}" \
  --workdir="$WORKDIR" --verbosity=-1 "$@"
echo "[demo] done in $(( $(date +%s) - start )) s; overlays: $WORKDIR/eval_*/<dataset>/*.png"
