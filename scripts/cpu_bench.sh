#!/usr/bin/env bash
# CPU decode tok/s of the default model in one run: transformers' generate, catsgen dense, catsgen
# CATS-50%, and the default model's first calibration by phase (scripts/cpu_bench.py). Installs
# nothing: transformers is a test-only dependency. NEW_TOKENS / ROUNDS change the run's size.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if ! "$PY" -c "import transformers" 2>/dev/null; then
    echo "cpu_bench compares against transformers, which is not installed: pip install transformers" >&2
    exit 1
fi
exec "$PY" scripts/cpu_bench.py
