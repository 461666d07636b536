#!/usr/bin/env bash
# Creates bench/.ref_venv: the reference Mask2Former's own environment (PyTorch, CPU build).
#
# The project never installs torch; only the benchmarks' reference side needs it, so it
# lives in a separate venv (ignored by git). Pinned: torch 2.13.0 (CPU wheel),
# transformers 4.57.6 (the project's pin), scipy, numpy, pillow (its image processor).
#   bash bench/ref_env.sh            # once; later runs reuse the venv.
# Wheels in a `.whl` folder at the repository root (e.g. on an offline GPU machine) are
# used first when present.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=bench/.ref_venv
TORCH=${REF_TORCH:-torch==2.13.0}
if [[ -x $VENV/bin/python ]] && $VENV/bin/python -c "import torch, transformers, scipy, PIL" 2>/dev/null; then
  echo "reference venv ready: $VENV"; exit 0
fi
python3 -m venv "$VENV"
extra=()
[[ -d .whl ]] && extra=(--find-links .whl)
"$VENV/bin/pip" install -q "${extra[@]}" "$TORCH" transformers==4.57.6 scipy numpy pillow
"$VENV/bin/python" -c "import torch, transformers; print('reference venv:', torch.__version__, transformers.__version__)"
