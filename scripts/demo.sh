#!/usr/bin/env bash
# Set up .venv, then generate the same prompt with SmolLM2-135M-Instruct dense and at 50% CATS, and
# end with both side by side (decode tok/s, measured sparsity). The first run converts the model
# into ~/.cache/catsgen and calibrates it once (under a minute on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
PROMPT=${PROMPT:-"Explain in two sentences why the sky is blue."}
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
for s in 0 0.5; do
    echo "=== sparsity $s ==="
    # stdout to the terminal, stderr through tee into the log as well (the pipeline waits for tee)
    { python generate.py --chat --prompt "$PROMPT" --max-new-tokens 80 --sparsity "$s" 2>&1 1>&3 \
        | tee "$logs/$s" >&2; } 3>&1
done
echo
echo "=== dense and CATS side by side (same prompt, this machine) ==="
for s in 0 0.5; do
    rate=$(grep -o 'then [0-9.]* tok/s; [^]]*' "$logs/$s" | tail -1 | sed 's/^then //')
    measured=$(grep -o 'measured [0-9.]* overall' "$logs/$s" | grep -o '[0-9.]*' || echo 0.000)
    printf 'sparsity %-4s measured sparsity %s  decode %s\n' "$s" "$measured" "$rate"
done
