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
#   bash launch/tpu_pod.sh logs                        # follow worker 0's log
#   bash launch/tpu_pod.sh stop                        # SIGTERM: checkpoint, then exit
#   bash launch/tpu_pod.sh delete
#
# `run CONFIG NAME` trains with --workdir=$BUCKET/dataseg/NAME and
# --config.data_dir=$DATA_DIR (default $BUCKET/tensorflow_datasets: the prepared TFDS datasets,
# see README). A second `run` with the same NAME resumes from the last checkpoint. The TPU VM's
# service account needs read/write access to the bucket. Plan first:
#   python -m dataseg.plan --config=configs/joint_r50.py --mesh=data=32
set -euo pipefail
: "${PROJECT:?set PROJECT}" "${ZONE:?set ZONE}" "${TPU_NAME:?set TPU_NAME}"
ACCELERATOR="${ACCELERATOR:-v4-64}"
VERSION="${VERSION:-tpu-ubuntu2204-base}"
REMOTE_DIR="${REMOTE_DIR:-dataseg}"  # relative to each worker's home.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GC=(gcloud compute tpus tpu-vm --project="$PROJECT" --zone="$ZONE")

on_all() {  # on_all 'shell command': the same command on every worker, in parallel.
  "${GC[@]}" ssh "$TPU_NAME" --worker=all --command="$1"
}

cmd="${1:-}"
shift || true
case "$cmd" in
  create)
    # SPOT=1 for a preemptible slice (SIGTERM -> checkpoint -> exit 0; `run` again resumes).
    "${GC[@]}" create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$VERSION" \
        ${SPOT:+--spot}
    ;;
  copy)
    tarball="$(mktemp -d)/dataseg.tar.gz"
    tar -C "$ROOT" -czf "$tarball" --exclude=.venv --exclude=.git --exclude=workdirs \
        --exclude=__pycache__ --exclude=data --exclude=bench/.ref_venv .
    "${GC[@]}" scp "$tarball" "$TPU_NAME:~/dataseg.tar.gz" --worker=all
    on_all "mkdir -p ~/$REMOTE_DIR && tar -C ~/$REMOTE_DIR -xzf ~/dataseg.tar.gz"
    ;;
  setup)
    # The base image has Python 3.10; the pins need 3.11 (deadsnakes if jammy's is missing).
    on_all "set -e; cd ~/$REMOTE_DIR
      if ! command -v python3.11 >/dev/null; then
        sudo apt-get update -qq
        sudo apt-get install -y -qq python3.11 python3.11-venv || {
          sudo add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get update -qq &&
          sudo apt-get install -y -qq python3.11 python3.11-venv; }
      fi
      PYTHON=python3.11 bash launch/setup_env.sh
      JAX_VERSION=\$(sed -n 's/^jax==//p' requirements.txt)
      .venv/bin/python -m pip install -q \"jax[tpu]==\$JAX_VERSION\"
      .venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.devices()[0].device_kind)'"
    ;;
  run)
    if [ $# -lt 2 ]; then
      echo "usage: bash launch/tpu_pod.sh run CONFIG NAME [dataseg.main flags]" >&2
      exit 2
    fi
    : "${BUCKET:?set BUCKET (gs://...)}"
    config="$1"; name="$2"; shift 2
    workdir="$BUCKET/dataseg/$name"
    data_dir="${DATA_DIR:-$BUCKET/tensorflow_datasets}"
    extra=""
    if [ $# -gt 0 ]; then extra="$(printf ' %q' "$@")"; fi
    # --distributed: one process per host joined by jax.distributed.initialize(). The CLIP
    # class-name embeddings are computed once per worker into a local cache (not on GCS).
    on_all "cd ~/$REMOTE_DIR && source .venv/bin/activate && export PYTHONPATH=\$PWD \
      TF_CPP_MIN_LOG_LEVEL=2 && \
      nohup python -m dataseg.main --config=$config --workdir=$workdir \
        --config.data_dir=$data_dir --config.text.cache_dir=\$HOME/.cache/dataseg/text \
        --distributed $extra > ~/dataseg_$name.log 2>&1 &
      echo \$! > ~/dataseg_$name.pid
      echo \"worker \$(hostname): started, log ~/dataseg_$name.log\""
    ;;
  logs)
    "${GC[@]}" ssh "$TPU_NAME" --worker=0 --command="tail -n 100 -F ~/dataseg_*.log"
    ;;
  stop)
    # The process ids `run` recorded; SIGTERM makes dataseg.main checkpoint and exit 0.
    on_all "for f in ~/dataseg_*.pid; do [ -f \"\$f\" ] && kill -TERM \$(cat \"\$f\") || true; done"
    ;;
  delete)
    "${GC[@]}" delete "$TPU_NAME" --quiet
    ;;
  *)
    sed -n '2,20p' "$0"
    exit 2
    ;;
esac
