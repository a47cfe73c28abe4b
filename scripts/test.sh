#!/usr/bin/env bash
# Set up .venv with the test extras and run the whole test suite (this is what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
CATSGEN_EXTRAS=test . scripts/setup.sh
python -m pytest -q "$@"
