#!/usr/bin/env bash
# Issues 14's and 13's measurements in one device call: checks, attention timings, the per-layer
# profile before/after, the W_o GEMV question, the bench rows; for issue 13 the int8 launch floor in
# parts (floor_int8), the int8 launches' SASS from the device's Triton (sass) and, for the tiles in
# $TILES, the model A/B in one process (tiles_ab; QUANTIZE=none for bf16 weights). Session 15's
# steps for the word tiles and register caps are in its history (notes/kernels.md v15).
# Usage: scripts/gpu_issue14.sh [STEP...]
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -e . -q --root-user-action=ignore 2>&1 | grep -v WARNING
step() {  # name, seconds, command...: log to $OUT/name.log, print its tail and wall time
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; local rc=$?
    echo "== $name rc=$rc $((SECONDS - t0)) s"; tail -n 40 "$OUT/$name.log"
}
for s in "${@:-checks attention profile bench}"; do
  for part in $s; do
    case $part in
      checks) step tests_gpu 300 python3 -m pytest -q -p no:cacheprovider tests_gpu -x ;;
      attention) step attention 180 python3 scripts/gpu_attention.py ;;
      profile) step profile 240 python3 scripts/gpu_profile.py --sparsity 0 0.5 ;;
      profile_int8) step profile_int8 240 python3 scripts/gpu_profile.py --sparsity 0 0.5 --quantize int8 ;;
      unfused) step profile_unfused 240 python3 scripts/gpu_profile.py --sparsity 0 0.5 --unfused ;;
      gemv) step gemv 120 python3 scripts/gpu_int8.py --float-gemv ;;
      copy) step copy 60 python3 scripts/gpu_copy.py ;;
      gated) step gated 200 python3 scripts/gpu_int8.py --gated ;;
      kernels) step kernels 150 python3 -m catsgen.kernels.bench --shapes 4096x11008 --batch 1 --sparsity 0.5,0.7 ;;
      bench) step bench_llama 300 python3 bench.py --preset llama-2-7b --sparsity 0 0.5 0.7 --new-tokens 256 --repeats 5 --json "$OUT/llama-2-7b.json" ;;
      bench_int8) step bench_int8 300 python3 bench.py --preset llama-2-7b --quantize int8 --sparsity 0 0.5 0.7 --new-tokens 256 --repeats 5 --json "$OUT/llama-2-7b-int8.json" ;;
      sparse) step sparse 200 python3 scripts/gpu_sparse.py ;;
      floor_int8) step floor_int8 200 python3 scripts/gpu_launch_floor.py --int8 ;;
      sass) step sass 150 python3 scripts/sass_report.py --model int8 B=1 NORM=True ;;  # the device's Triton
      tiles_ab) step tiles_ab 580 python3 scripts/gpu_tiles_ab.py --quantize "${QUANTIZE:-int8}" --try $TILES ;;  # TILES="f=1,g=2 ..." 
      bench_mistral) step bench_mistral 300 python3 bench.py --preset mistral-7b --sparsity 0 0.5 0.7 --new-tokens 256 --repeats 5 --json "$OUT/mistral-7b.json" ;;
    esac
  done
done
