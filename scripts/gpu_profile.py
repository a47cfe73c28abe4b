"""Where a decode step's time goes: the compiled (CUDA-graph) step of a preset with random
weights, profiled at each sparsity; prints the kernels of one step, their time and count.

    python3 scripts/gpu_profile.py [--preset llama-2-7b] [--sparsity 0 0.7] [--steps 20] [--quantize int8]
"""
import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from catsgen import cats
from catsgen.bench import BenchSettings, bench_thresholds, build_model
from catsgen.generate import SamplingParams, make_decode_step


@torch.no_grad()
def profile_steps(model, step, steps: int, pos: int):
    token = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    input_pos = torch.tensor([pos], device="cuda")
    for _ in range(5):  # compile, capture, warm
        token = step(model, token, input_pos, SamplingParams()).clone()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        token = step(model, token, input_pos, SamplingParams()).clone()
    end.record()
    end.synchronize()
    step_us = start.elapsed_time(end) * 1e3 / steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            token = step(model, token, input_pos, SamplingParams()).clone()
        torch.cuda.synchronize()
    kernels = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name][0] += e.device_time / steps
            kernels[e.name][1] += 1 / steps
    return step_us, kernels


@torch.no_grad()
def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="llama-2-7b")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.7])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--pos", type=int, default=256, help="cache position of the profiled steps")
    p.add_argument("--quantize", default="none", choices=("none", "int8"))
    a = p.parse_args()
    torch.manual_seed(0)
    model = build_model(BenchSettings(device="cuda", dtype="bfloat16", quantize=a.quantize), None, a.preset)
    table = bench_thresholds(model, None, None, True)
    step = make_decode_step(True, "cuda")
    for s in a.sparsity:
        if s > 0:
            cats.set_sparsity(model, table, s)
        else:
            cats.set_dense(model)
        step_us, kernels = profile_steps(model, step, a.steps, a.pos)
        busy = sum(t for t, _ in kernels.values())
        print(f"\n== {a.preset} s={s}: step {step_us:.1f} us (events), kernels busy {busy:.1f} us, "
              f"gaps {step_us - busy:.1f} us, {sum(n for _, n in kernels.values()):.0f} kernels")
        for name, (t, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]:
            print(f"{t:9.1f} us {n:6.1f}x {t / max(n, 1e-9):7.2f} us/call  {name[:110]}")


if __name__ == "__main__":
    main()
