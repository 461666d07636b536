#!/usr/bin/env bash
# One prepared GPU run of both benchmarks (bf16), ours and the reference, on one GPU.
#
# Runs on the lent GPU machine (its image has python3 with JAX (CUDA), flax, optax, torch,
# transformers; ml_collections travels as a wheel in .whl/, fetched here once with
#   pip download --no-deps --only-binary=:all: -d .whl ml_collections==1.1.0
# and the run's `carry` names .whl). Budget: 7 minutes of GPU time in all (issue 15): each
# part has its own timeout (sum 405 s + start-up) so a slow part cannot eat the others, and
# every figure is printed as soon as it is known (compile times first: a slow compile is a
# result too). Output: $OUT/gpu.txt (the log: JSON lines + summary lines, also on stdout)
# and $OUT/gpu_summary.json (bench/gpu_summary.py: one object with every figure).
#   R50 (ResNet-50, msdeform pixel decoder, 100 queries, 9 layers, 112x112 points,
#   133 classes), 1024x1024, a fresh persistent compilation cache ($CACHE):
#   1. our train step, batch 2, bf16, cold (empty cache): set-up + init, compile, time from
#      process start to the first finished step, step time, images/s, MFU = XLA
#      cost-analysis FLOPs per step / (step time x 989e12 dense bf16 FLOP/s, H100/H200 SXM).
#   2. the same again in a new process: warm start (every program from the cache).
#   3. the reference's train step (transformers Mask2Former, torch CUDA, bf16 autocast).
#   4. panoptic inference, batch 1 and 8, ours, then the reference.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/dataseg_gpu}
CACHE=${CACHE:-/tmp/dataseg_gpu_jax_cache}
mkdir -p "$OUT"
rm -rf "$CACHE"
LOG=$OUT/gpu.txt
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 REF_PYTHON=$PY
{
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import jax, flax, optax, torch, transformers; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__, torch.cuda.is_available(), 'transformers', transformers.__version__)"
} 2>&1 | tee "$LOG"
run() {  # run SECONDS LABEL CMD...: time-boxed part, output appended to the log.
  local limit=$1 label=$2; shift 2
  echo "## $label: $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v -E "Warning|warn\(" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "## $label: exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$LOG"
}
# --nomalloc_retain (the default; explicit so that it stays so): no re-exec under the CPU
# malloc settings (it would restart the clock).
TRAIN=(bench/train_step.py --side ours --sizes 1024 --batch 2 --dtype bfloat16
       --compilation_cache "$CACHE" --nomalloc_retain)
run 170 train_cold $PY "${TRAIN[@]}" --steps 5
run 50 train_warm $PY "${TRAIN[@]}" --steps 2
run 45 train_reference $PY bench/train_step.py --side reference --sizes 1024 --batch 2 \
  --nomalloc_retain --ref_steps 5 --ref_args "--device cuda --bf16 --warmup 2"
run 95 infer_ours $PY bench/inference.py --side ours --sizes 1024 --batches 1,8 \
  --nomalloc_retain --dtype bfloat16 --steps 5 --compilation_cache "$CACHE"
run 45 infer_reference $PY bench/inference.py --side reference --sizes 1024 --batches 1,8 \
  --nomalloc_retain --ref_steps 5 --ref_args "--device cuda --bf16 --warmup 2"
$PY bench/gpu_summary.py "$LOG" > "$OUT/gpu_summary.json"
cat "$OUT/gpu_summary.json"
echo "## done" | tee -a "$LOG"
