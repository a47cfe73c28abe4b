#!/usr/bin/env bash
# Tensor-parallel numbers (issue 18) on a multi-GPU device machine (nvidia-h200-x2 / -x4 / -x8),
# from the repo root. Usage: scripts/gpu_tp.sh [7b|70b|all]   (JSON lands in $OUT or ./out)
# 7b: Llama-2-7B at N = 1 and 2 (dense, s=0.5, s=0.7); 70b: Llama-2-70B at the largest N here.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -e . -q 2>&1 | grep -v WARNING
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
bench() {  # bench N PRESET: bench.py on N ranks
    local n=$1 model=$2
    python3 -m torch.distributed.run --nproc-per-node "$n" bench.py --preset "$model" --sparsity 0 0.5 0.7 \
        --new-tokens 256 --repeats 5 --json "$OUT/$model-tp$n.json"
}
part=${1:-all}
if [[ $part == 7b || $part == all ]]; then
    bench 1 llama-2-7b
    bench 2 llama-2-7b
fi
if [[ $part == 70b || $part == all ]]; then
    n=$GPUS; while (( 8 % n )); do n=$((n - 1)); done  # 70B's 8 KV heads: N in 1, 2, 4, 8
    bench "$n" llama-2-70b
fi
