#!/usr/bin/env bash
# Issues 14's and 13's measurements in one device call: checks, attention timings, the per-layer
# profile before/after, the W_o GEMV question, the bench rows; for issue 13 the int8 launch floor in
# parts (floor_int8), the int8 launches' SASS from the device's Triton (sass, and sass_try for some
# variants), the int8 word tiles (words), register caps (regs, regs_bf16) and, for the tiles in
# $TILES, the model A/B in one process (tiles_ab; QUANTIZE=none for bf16 weights).
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
      sass_try) step sass_try 200 python3 scripts/sass_report.py --try model gate_regs=80 \
          int8_words=2,gate_regs=80,up_regs=80,down_words=2,down_regs=128 gate_f=4,gate_d=2048,gate_regs=80 \
          gate_f=8,gate_d=256,gate_warps=2,up_d=256,up_steps=8,int8_words=2,word_lanes=2 ;;
      # word_lanes=2: the lanes' tile as words x rows, which Triton 3.6 (the device's) lays out one
      # word a lane with no barrier in the loop; word_lanes=1 does that under 3.9 only (v14). The down
      # launch's words a step ahead with its cap (166 registers uncapped under 3.6: 12 an SM, not 16)
      words) step words 400 python3 scripts/gpu_sparse.py --weights int8 --try int8_words=1 \
          gate_f=8,int8_words=2 down_words=1 down_words=2 \
          gate_f=8,gate_d=256,gate_warps=2,up_d=256,up_steps=8,int8_words=1,word_lanes=2 \
          gate_f=8,gate_d=256,gate_warps=2,up_d=256,up_steps=8,int8_words=2,word_lanes=2 \
          gate_f=8,gate_d=256,gate_warps=2,up_d=256,up_steps=8,int8_words=2,word_lanes=1 \
          gate_f=8,gate_d=128,gate_warps=1,up_r=4,up_d=128,up_steps=16,warps=1,int8_words=2,word_lanes=2 \
          gate_f=8,gate_d=256,gate_warps=2,up_d=256,up_steps=8,int8_words=2,word_lanes=2,down_words=2,down_regs=128 ;;
      # the int8 gate takes 91 registers under the device's Triton 3.6 (80 under 3.9): 5 programs an
      # SM, 688 programs in 1.04 waves; capped at 80, one wave. The model's loops load a step's
      # weights and use them in the same iteration (no pipelining): the words a step ahead, with the
      # caps keeping as many programs an SM (6 / 12 / 16), double the bytes in flight. Narrow gates
      # (4 rows, warps splitting the columns: no barrier) capped at 80 (notes/kernels.md v14)
      regs) step regs 300 python3 scripts/gpu_sparse.py --weights int8 --try gate_regs=80 \
          int8_words=2,gate_regs=80 int8_words=2,gate_regs=80,up_regs=80 down_words=2,down_regs=128 \
          int8_words=2,gate_regs=80,up_regs=80,down_words=2,down_regs=128 \
          gate_f=4,gate_d=2048,gate_regs=80 gate_f=4,gate_d=1024,gate_warps=2,gate_regs=80 ;;
      # bf16 (3.6): up 126 registers, 8 an SM (1056 slots), down 124 on one warp, 16 an SM (2112): fewer
      # than the ~1376 / ~2752 working programs at s=0.5 (at 96 the down loop reads local memory)
      regs_bf16) step regs_bf16 200 python3 scripts/gpu_sparse.py --weights bf16 --try up_regs=96 up_regs=104 \
          down_regs=104 up_regs=96,down_regs=104 ;;
      tiles_ab) step tiles_ab 580 python3 scripts/gpu_tiles_ab.py --quantize "${QUANTIZE:-int8}" --try $TILES ;;  # TILES="f=1,g=2 ..." 
      bench_mistral) step bench_mistral 300 python3 bench.py --preset mistral-7b --sparsity 0 0.5 0.7 --new-tokens 256 --repeats 5 --json "$OUT/mistral-7b.json" ;;
    esac
  done
done
