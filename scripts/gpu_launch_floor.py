"""What one launch of a plain streaming read costs on this GPU, apart from its bytes: the floor
under every decode launch (notes/kernels.md v12). A Triton kernel whose programs each read
rows x columns x steps bf16 weights (like the CATS and GEMV launches' tiles) and sum them is timed
at several sizes, as CUDA-graph replays reading fresh memory every call (L2 holds none of it);
time = intercept + bytes / rate is fitted over the sizes. The intercept is the launch's fixed
cost (start, ramp, drain), the rate its streaming bandwidth.
    python3 scripts/gpu_launch_floor.py"""
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, as for bench.py
from catsgen.kernels.bench import graph_time_us  # noqa: E402

MB = 2**20
SIZES_MB = (2, 8, 16, 32, 48, 64, 90)
FOOTPRINT_MB = 512  # a graph's calls read this much, each its own slice: L2 (60 MB) keeps none
# (warps, rows, columns, steps): the one-warp down launch's tile, the up launch's, the gate's
SHAPES = ((1, 32, 128, 2), (2, 8, 1024, 2), (4, 16, 256, 8))


@triton.jit
def _stream(src_ptr, out_ptr, ROWS: tl.constexpr, COLS: tl.constexpr, STEPS: tl.constexpr):
    pid = tl.program_id(0)
    tile = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    base = src_ptr + pid.to(tl.int64) * (ROWS * COLS * STEPS)
    acc = tl.zeros([ROWS, COLS], tl.float32)
    for step in range(STEPS):
        acc += tl.load(base + step * ROWS * COLS + tile, eviction_policy="evict_first").to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc))  # one store a program, so the loads are not dead code


def launch_us(buf, out, shape, size_mb):
    warps, rows, cols, steps = shape
    per_program = rows * cols * steps  # elements
    programs = size_mb * MB // (2 * per_program)
    n, n_calls = programs * per_program, FOOTPRINT_MB // size_mb

    def calls():
        for i in range(n_calls):
            _stream[(programs,)](buf[i * n:], out, ROWS=rows, COLS=cols, STEPS=steps, num_warps=warps)
    return graph_time_us(calls, calls=1, replays=15) / n_calls, programs


def main():
    buf = torch.randn(FOOTPRINT_MB * MB // 2, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(2**20, device="cuda", dtype=torch.float32)
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    for shape in SHAPES:
        points = []
        for size_mb in SIZES_MB:
            us, programs = launch_us(buf, out, shape, size_mb)
            points.append((size_mb * MB, us))
            print(f"warps {shape[0]} tile {shape[1]}x{shape[2]} x {shape[3]} steps: {size_mb:3d} MB, "
                  f"{programs:5d} programs: {us:6.2f} us ({size_mb * MB / us / 1e3:.0f} GB/s)", flush=True)
        fit = [(b, t) for b, t in points if b >= 8 * MB]
        xs, ys = torch.tensor([b for b, _ in fit], dtype=torch.float64), torch.tensor([t for _, t in fit],
                                                                                     dtype=torch.float64)
        slope = ((xs - xs.mean()) * (ys - ys.mean())).sum() / ((xs - xs.mean()) ** 2).sum()
        intercept = ys.mean() - slope * xs.mean()
        print(f"  fit over >= 8 MB: {intercept.item():.2f} us + bytes at {1 / slope.item() / 1e3:.0f} GB/s", flush=True)


if __name__ == "__main__":
    main()
