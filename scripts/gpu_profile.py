"""Where a decode step's time goes: the compiled (CUDA-graph) step of a preset with random
weights, profiled at each sparsity; prints the kernels of one step, their time and count.

    python3 scripts/gpu_profile.py [--preset llama-2-7b] [--sparsity 0 0.7] [--steps 20] [--quantize int8]
                                   [--unfused]   (also the decode attention before issue 14's fusion)
"""
import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from catsgen import cats
from catsgen.bench import BenchSettings, bench_thresholds, build_model
from catsgen.generate import SamplingParams, make_decode_step
from catsgen.kernels import decode_attention, split_heads
from catsgen.model import Attention


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


def unfused_attention(self, x, rope, mask, input_pos=None, residual=None):
    """Attention.forward's decode before RoPE and the cache write moved into the attention launch
    (issue 14): torch ops for RoPE and the cache write, then catsgen::decode_attention."""
    qkv = self.wqkv(x)
    B, T, _ = qkv.shape
    q, k, v = split_heads(qkv, self.n_heads, self.n_kv_heads, rope.cos, rope.sin)
    k, v = self.kv_cache.update(input_pos, k, v)
    y = decode_attention(q, k, v, input_pos, self.sliding_window)
    return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim), residual)


@torch.no_grad()
def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="llama-2-7b")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.7])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--pos", type=int, default=256, help="cache position of the profiled steps")
    p.add_argument("--quantize", default="none", choices=("none", "int8"))
    p.add_argument("--unfused", action="store_true", help="also profile the decode attention before the fusion")
    a = p.parse_args()
    torch.manual_seed(0)
    model = build_model(BenchSettings(device="cuda", dtype="bfloat16", quantize=a.quantize), None, a.preset)
    table = bench_thresholds(model, None, None, True)
    fused = Attention.forward
    for variant in ("fused", "unfused") if a.unfused else ("fused",):
        Attention.forward = fused if variant == "fused" else unfused_attention
        torch._dynamo.reset()
        profile_sparsities(model, table, a, variant)
    Attention.forward = fused


def profile_sparsities(model, table, a, variant):
    step = make_decode_step(True, "cuda")
    for s in a.sparsity:
        if s > 0:
            cats.set_sparsity(model, table, s)
        else:
            cats.set_dense(model)
        step_us, kernels = profile_steps(model, step, a.steps, a.pos)
        busy = sum(t for t, _ in kernels.values())
        print(f"\n== {a.preset} {variant} s={s}: step {step_us:.1f} us (events), kernels busy {busy:.1f} us, "
              f"gaps {step_us - busy:.1f} us, {sum(n for _, n in kernels.values()):.0f} kernels")
        for name, (t, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]:
            print(f"{t:9.1f} us {n:6.1f}x {t / max(n, 1e-9):7.2f} us/call  {name[:110]}")


if __name__ == "__main__":
    main()
