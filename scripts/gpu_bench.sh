#!/usr/bin/env bash
# The end-to-end GPU numbers for the README: run on the device machine from the repo root.
# Usage: scripts/gpu_bench.sh [models|int8|batch|kernels|all]   (results land in $OUT or ./out)
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -e . -q 2>&1 | grep -v WARNING
part=${1:-all}
if [[ $part == models || $part == all ]]; then
    python3 -m pytest -q -p no:cacheprovider tests_gpu 2>&1 | tail -3
    for m in llama-2-7b mistral-7b; do
        python3 bench.py --preset $m --sparsity 0 0.5 0.7 --new-tokens 256 --repeats 5 --json "$OUT/$m.json"
    done
fi
if [[ $part == int8 ]]; then  # alone: the bf16 Llama-2-7B rows first, in the same call (all: from models)
    python3 bench.py --preset llama-2-7b --sparsity 0 0.5 0.7 --new-tokens 256 --repeats 5 --json "$OUT/llama-2-7b.json"
fi
if [[ $part == int8 || $part == all ]]; then
    python3 bench.py --preset llama-2-7b --quantize int8 --sparsity 0 0.5 0.7 --new-tokens 256 --repeats 5 \
        --json "$OUT/llama-2-7b-int8.json"
fi
if [[ $part == batch || $part == all ]]; then
    python3 bench.py --preset llama-2-7b --sparsity 0 0.5 0.7 --batch-size 4 --new-tokens 128 --repeats 3 \
        --json "$OUT/llama-2-7b-b4.json"
fi
if [[ $part == kernels || $part == all ]]; then
    python3 bench.py kernels
fi
