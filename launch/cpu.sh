#!/usr/bin/env bash
# Train (and evaluate) on this machine's CPU.
#
#   bash launch/cpu.sh CONFIG WORKDIR [more dataseg.main flags]
#   bash launch/cpu.sh configs/demo.py:smoke /tmp/smoke
#   bash launch/cpu.sh configs/demo.py workdirs/demo --config.total_steps=500
#   bash launch/cpu.sh configs/demo.py workdirs/demo --mode=eval
#
# CPU_DEVICES=N splits the CPU into N simulated devices (to try a mesh, e.g.
# `CPU_DEVICES=4 bash launch/cpu.sh configs/demo.py:smoke /tmp/m --config.mesh.fsdp=2`).
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,10p' "$0"
  exit 2
fi
# setup_env.sh cd's to the repo: relative CONFIG/WORKDIR are resolved against the caller's dir.
absolute() { case "$1" in /*|*://*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
CONFIG="$(absolute "$1")"
WORKDIR="$(absolute "$2")"
shift 2
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
export JAX_PLATFORMS=cpu
if [ -n "${CPU_DEVICES:-}" ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${CPU_DEVICES}"
fi
exec python -m dataseg.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
