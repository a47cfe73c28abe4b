#!/usr/bin/env bash
# Set up .venv, then generate the same prompt with SmolLM2-135M-Instruct dense and at 50% CATS.
# The first run converts the model into ~/.cache/catsgen and calibrates it once (a few minutes on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
PROMPT=${PROMPT:-"Explain in two sentences why the sky is blue."}
for s in 0 0.5; do
    echo "=== sparsity $s ==="
    python generate.py --chat --prompt "$PROMPT" --max-new-tokens 80 --sparsity "$s"
done
