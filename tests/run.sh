#!/usr/bin/env bash
# The README's test command: set-up (.venv + pinned requirements) and the whole suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../launch/setup_env.sh"
export JAX_PLATFORMS=cpu
# House style first (pyproject.toml [tool.ruff]; `ruff format .` fixes the formatting).
python -m ruff check --quiet "$(dirname "${BASH_SOURCE[0]}")/.."
python -m ruff format --check --quiet "$(dirname "${BASH_SOURCE[0]}")/.."
# No path given: pyproject.toml's testpaths (tests/); paths given: only those.
# TEST_WORKERS processes (pytest-xdist, default 2: most of the suite's time is single-threaded
# XLA compilation), each test file on one worker so module fixtures are built once;
# TEST_WORKERS=0 runs in this process.
python -m pytest -q -p no:cacheprovider -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
