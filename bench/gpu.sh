#!/usr/bin/env bash
# One prepared GPU run of both benchmarks (bf16), ours and the reference, on one GPU.
#
# Runs on the lent GPU machine (its image has python3 with JAX (CUDA), flax, optax, torch,
# transformers; ml_collections travels as a wheel in .whl/, fetched here once with
#   pip download --no-deps --only-binary=:all: -d .whl ml_collections==1.1.0
# and the run's `carry` names .whl). Budget: <= 8 minutes in all; each part has its own
# timeout so one slow part cannot eat the others. Output: $OUT/gpu.txt (JSON lines + the
# summary lines), also on stdout.
#   R50 (ResNet-50, msdeform pixel decoder, 100 queries, 9 layers, 112x112 points,
#   133 classes), 1024x1024:
#   1. our train step, batch 2, bf16: step time, images/s, MFU = XLA cost-analysis FLOPs
#      per step / (step time x 989e12 dense bf16 FLOP/s, H100/H200 SXM).
#   2. the reference's train step (transformers Mask2Former, torch CUDA, bf16 autocast).
#   3. panoptic inference, batch 1 and 8, ours and the reference.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/dataseg_gpu}
mkdir -p "$OUT"
LOG=$OUT/gpu.txt
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 REF_PYTHON=$PY
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import jax, flax, optax, torch, transformers; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__, torch.cuda.is_available(), 'transformers', transformers.__version__)"
} 2>&1 | tee "$LOG"
run() {  # run SECONDS CMD...: time-boxed part, output appended to the log.
  local limit=$1; shift
  echo "## $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | grep -v -E "Warning|warn\(" | tee -a "$LOG"
}
run 210 $PY bench/train_step.py --side ours --sizes 1024 --batch 2 --dtype bfloat16 --steps 10
run 60 $PY bench/train_step.py --side reference --sizes 1024 --batch 2 --ref_steps 5 \
  --ref_args "--device cuda --bf16 --warmup 2"
run 150 $PY bench/inference.py --side ours --sizes 1024 --batches 1,8 --dtype bfloat16 --steps 10
run 60 $PY bench/inference.py --side reference --sizes 1024 --batches 1,8 --ref_steps 5 \
  --ref_args "--device cuda --bf16 --warmup 2"
echo "## done" | tee -a "$LOG"
