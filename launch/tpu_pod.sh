#!/usr/bin/env bash
# Cloud TPU pod slice: create the TPU VM, copy the code to every worker, set up every worker,
# run on all workers at once (one process per host, joined by jax.distributed), data and
# workdir on GCS.
#
#   export PROJECT=my-project ZONE=us-central2-b TPU_NAME=dataseg-v4 BUCKET=gs://my-bucket
#   bash launch/tpu_pod.sh create                      # TPU VM (ACCELERATOR=v4-64 by default)
#   bash launch/tpu_pod.sh copy                        # this checkout -> ~/dataseg on all workers
#   bash launch/tpu_pod.sh setup                       # Python 3.11 .venv + jax[tpu] on all workers
#   bash launch/tpu_pod.sh run configs/joint_r50.py joint_r50 [more dataseg.main flags]
#   bash launch/tpu_pod.sh logs [NAME]                 # follow every worker's log, prefixed
#   bash launch/tpu_pod.sh stop                        # SIGTERM to python: checkpoint, exit 0
#   bash launch/tpu_pod.sh status                      # slice state + training pids per worker
#   bash launch/tpu_pod.sh recover configs/joint_r50.py joint_r50   # after a spot pre-emption
#   bash launch/tpu_pod.sh delete
#
# `run CONFIG NAME` trains with --workdir=$BUCKET/dataseg/NAME and
# --config.data_dir=$DATA_DIR (default $BUCKET/tensorflow_datasets: the prepared TFDS datasets,
# see README). A second `run` with the same NAME resumes from the last checkpoint (all of the
# workdir, data positions included, is on GCS). A pre-empted Spot slice cannot be restarted:
# `recover` deletes it if needed, recreates it, copies, sets up and runs again (resuming).
# The TPU VM's service account needs read/write access to the bucket. Plan first:
#   python -m dataseg.plan --config=configs/joint_r50.py --mesh=data=32
#
# Environment: ACCELERATOR (v4-64), VERSION (runtime; default chosen from ACCELERATOR),
# SPOT=1 (Spot VMs), QUEUED=1 (create through a queued resource: waits for capacity),
# DATA_DIR, REMOTE_DIR (dataseg, under each worker's home), FOLLOW=0 (`logs` prints, no -F).
set -euo pipefail
: "${PROJECT:?set PROJECT}" "${ZONE:?set ZONE}" "${TPU_NAME:?set TPU_NAME}"
ACCELERATOR="${ACCELERATOR:-v4-64}"
default_version() {  # Cloud TPU's runtime image per generation (cloud.google.com/tpu/docs/runtimes).
  case "$1" in
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo tpu-ubuntu2204-base ;;  # v2, v3, v4
  esac
}
VERSION="${VERSION:-$(default_version "$ACCELERATOR")}"
REMOTE_DIR="${REMOTE_DIR:-dataseg}"  # relative to each worker's home.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GC=(gcloud compute tpus tpu-vm --project="$PROJECT" --zone="$ZONE")
QR=(gcloud compute tpus queued-resources --project="$PROJECT" --zone="$ZONE")

on_all() {  # on_all 'shell command': the same command on every worker, in parallel.
  "${GC[@]}" ssh "$TPU_NAME" --worker=all --command="$1"
}

q() { printf '%q' "$1"; }  # one word, quoted for the remote shell.

create() {
  if [ -n "${QUEUED:-}" ]; then
    "${QR[@]}" create "$TPU_NAME" --node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR" \
        --runtime-version="$VERSION" ${SPOT:+--spot}
    echo "queued resource $TPU_NAME requested; waiting until the slice is ACTIVE"
    until [ "$("${QR[@]}" describe "$TPU_NAME" --format='value(state.state)')" = ACTIVE ]; do
      sleep "${POLL_S:-30}"
    done
  else
    "${GC[@]}" create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$VERSION" \
        ${SPOT:+--spot}
  fi
}

delete() {
  if [ -n "${QUEUED:-}" ]; then
    "${QR[@]}" delete "$TPU_NAME" --force --quiet
  else
    "${GC[@]}" delete "$TPU_NAME" --quiet
  fi
}

copy() {
  tarball="$(mktemp -d)/dataseg.tar.gz"
  # Anchored excludes: only the checkout's own top-level folders, not any folder so named.
  tar -C "$ROOT" -czf "$tarball" --anchored --exclude=./.venv --exclude=./.git \
      --exclude=./workdirs --exclude=./data --exclude=./bench/.ref_venv \
      --no-anchored --exclude=__pycache__ .
  "${GC[@]}" scp "$tarball" "$TPU_NAME:~/dataseg.tar.gz" --worker=all
  on_all "mkdir -p ~/$(q "$REMOTE_DIR") && tar -C ~/$(q "$REMOTE_DIR") -xzf ~/dataseg.tar.gz"
}

setup() {
  # The base image has Python 3.10; the pins need 3.11 (deadsnakes if jammy's is missing).
  on_all "set -e; cd ~/$(q "$REMOTE_DIR")
    if ! command -v python3.11 >/dev/null; then
      sudo apt-get update -qq
      sudo apt-get install -y -qq python3.11 python3.11-venv || {
        sudo add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get update -qq &&
        sudo apt-get install -y -qq python3.11 python3.11-venv; }
    fi
    PYTHON=python3.11 bash launch/setup_env.sh
    JAX_VERSION=\$(sed -n 's/^jax==//p' requirements.txt)
    .venv/bin/python -m pip install -q -c requirements.lock \"jax[tpu]==\$JAX_VERSION\"
    .venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.devices()[0].device_kind)'"
}

run() {
  if [ $# -lt 2 ]; then
    echo "usage: bash launch/tpu_pod.sh run CONFIG NAME [dataseg.main flags]" >&2
    exit 2
  fi
  : "${BUCKET:?set BUCKET (gs://...)}"
  local config="$1" name="$2"
  shift 2
  local workdir="$BUCKET/dataseg/$name" data_dir="${DATA_DIR:-$BUCKET/tensorflow_datasets}"
  local args=(python -m dataseg.main --config="$config" --workdir="$workdir"
              --config.data_dir="$data_dir" --distributed "$@")
  local log pid inner
  log="~/dataseg_$(q "$name").log" pid="~/dataseg_$(q "$name").pid"
  inner="echo \$\$ > $pid; exec$(printf ' %q' "${args[@]}")"
  # --distributed: one process per host joined by jax.distributed.initialize(). The text
  # embeddings are cached in the workdir (process 0 computes, the others wait and read).
  # setsid + exec: the recorded pid is python's own and leads its process group, so `stop`
  # signals python itself (not a subshell that would leave it running).
  on_all "cd ~/$(q "$REMOTE_DIR") || exit 1
    source .venv/bin/activate
    export PYTHONPATH=\$PWD TF_CPP_MIN_LOG_LEVEL=2
    rm -f $pid
    setsid bash -c $(q "$inner") > $log 2>&1 < /dev/null &
    for i in 1 2 3 4 5 6 7 8 9 10; do [ -s $pid ] && break; sleep 0.5; done
    echo \"worker \$(hostname): started pid \$(cat $pid), log $log\""
}

logs() {  # every worker's log, each line prefixed with the worker's hostname.
  local pattern="~/dataseg_*.log"
  if [ $# -gt 0 ]; then pattern="~/dataseg_$(q "$1").log"; fi
  local follow="-F"
  if [ "${FOLLOW:-1}" = 0 ]; then follow=""; fi
  on_all "tail -n ${LINES_BACK:-100} $follow $pattern 2>&1 | sed -u \"s/^/[\$(hostname)] /\""
}

stop() {
  # SIGTERM to each recorded python (and its process group): dataseg.main agrees on a step
  # with the other hosts, checkpoints and exits 0. Waits until the processes are gone.
  on_all "for f in ~/dataseg_*.pid; do
      [ -f \"\$f\" ] || continue
      p=\$(cat \"\$f\")
      kill -TERM -- -\"\$p\" 2>/dev/null || kill -TERM \"\$p\" 2>/dev/null || true
      for i in \$(seq 1 ${STOP_WAIT_S:-600}); do kill -0 \"\$p\" 2>/dev/null || break; sleep 1; done
      if kill -0 \"\$p\" 2>/dev/null; then echo \"worker \$(hostname): pid \$p still running\"
      else echo \"worker \$(hostname): pid \$p stopped\"; rm -f \"\$f\"; fi
    done"
}

state() {  # READY, PREEMPTED, ... or MISSING
  "${GC[@]}" describe "$TPU_NAME" --format='value(state)' 2>/dev/null || echo MISSING
}

status() {
  echo "slice $TPU_NAME: $(state)"
  on_all "for f in ~/dataseg_*.pid; do [ -f \"\$f\" ] || continue; p=\$(cat \"\$f\");
    if kill -0 \"\$p\" 2>/dev/null; then s=running; else s=exited; fi
    echo \"worker \$(hostname): \$(basename \"\$f\" .pid) pid \$p \$s\"; done"
}

recover() {  # recover CONFIG NAME [flags]: recreate a pre-empted slice and resume NAME.
  local s
  s="$(state)"
  echo "slice $TPU_NAME: $s"
  if [ "$s" != READY ]; then
    if [ "$s" != MISSING ]; then delete; fi
    create
    copy
    setup
  fi
  run "$@"
}

cmd="${1:-}"
shift || true
case "$cmd" in
  create|delete|copy|setup|status) "$cmd" ;;
  run|logs|stop|recover) "$cmd" "$@" ;;
  *)
    sed -n '2,30p' "$0"
    exit 2
    ;;
esac
