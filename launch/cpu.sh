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
CONFIG="$1"
WORKDIR="$2"
shift 2
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
export JAX_PLATFORMS=cpu
if [ -n "${CPU_DEVICES:-}" ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${CPU_DEVICES}"
fi
exec python -m dataseg.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
