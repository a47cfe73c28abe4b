"""What one launch of a plain streaming read costs on this GPU, apart from its bytes: the floor
under every decode launch (notes/kernels.md v12). A Triton kernel whose programs each read
rows x columns x steps bf16 weights (like the CATS and GEMV launches' tiles) and sum them is timed
at several sizes, as CUDA-graph replays reading fresh memory every call (L2 holds none of it);
time = intercept + bytes / rate is fitted over the sizes. The intercept is the launch's fixed
cost (start, ramp, drain), the rate its streaming bandwidth.
--int8: the int8 CATS launches' work, part by part, at the bytes they read at s = 0.5 and 0.7, on
tiles of the gate's and the up launch's shapes (rows of D = columns x steps): the words streamed
with an integer sum (the floor with int8 data); then each row times x as the gate does it (one
token, the norm's x * g and squares, the offset conversion, runs of 16: tiles.rows_times_x1).
Against the CATS launches' own times (gpu_sparse), the differences split a launch's time above the
floor into its parts (session 15 also timed the gate and up tiles on int32 words, a step ahead and
one a lane: benchmarks/h200/session15/call1/floor_int8.log; those tiles were dropped).
    python3 scripts/gpu_launch_floor.py [--int8]"""
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, as for bench.py
from catsgen.kernels.bench import graph_time_us  # noqa: E402
from catsgen.kernels.tiles import rows_times_x1  # noqa: E402
from catsgen.kernels.to_f32 import OFFSET_INT8  # noqa: E402

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


# --int8: (warps, rows, columns, steps) of the gate and the up launch (the model's tiles); the work
# modes; the bytes the launches read at s = 0.5 (gate 43 MiB, up 21.5) and s = 0.7 (up 12.9)
INT8_SHAPES = ((4, 16, 512, 8), (2, 8, 512, 4))
INT8_MODES = ("stream", "bytes")
INT8_SIZES_MB = (12.9, 21.5, 43.0)


@triton.jit
def _int8_rows(w_ptr, x_ptr, g_ptr, out_ptr, D, ROWS: tl.constexpr, COLS: tl.constexpr, MODE: tl.constexpr):
    """Row sums of ROWS rows of an int8 [n, D] matrix: MODE 0 the words summed as integers, 1 rows
    times x as the gate does it (norm folded in, runs of 16)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    all_rows = rows >= 0
    if MODE == 0:
        tile = w_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * (D // 4) + tl.arange(0, COLS // 4)[None, :]
        acc = tl.zeros([ROWS, COLS // 4], tl.int32)
        for k in range(0, D, COLS):
            acc += tl.load(tile + k // 4, eviction_policy="evict_first")
        y = tl.sum(acc, axis=1).to(tl.float32)
    else:
        y, _ = rows_times_x1(w_ptr, x_ptr, rows, all_rows, D, 0, D, ROWS, COLS, True, OFFSET_INT8, g_ptr, True, 16)
    tl.store(out_ptr + rows, y)


def int8_rows(w, x, g, out, shape, mode):
    warps, rows, cols, _ = shape
    _int8_rows[(w.shape[0] // rows,)](w, x, g, out, w.shape[1], ROWS=rows, COLS=cols, MODE=mode, num_warps=warps)


def per_call_us(launch, n_calls):
    """One launch's time: launch(i) for the i-th of n_calls slices of the footprint, all in one CUDA
    graph (each reads memory the others do not, so L2 holds none of it), divided by n_calls."""
    return graph_time_us(lambda: [launch(i) for i in range(n_calls)], calls=1, replays=15) / n_calls


def check_int8_rows(device):
    """Each mode's row sums against torch, at a small shape (also runs under the interpreter)."""
    gen = torch.Generator().manual_seed(0)
    for shape in INT8_SHAPES:
        _, rows, cols, steps = shape
        w = torch.randint(-127, 128, (2 * rows, cols * steps), generator=gen, dtype=torch.int8)
        x, g = torch.randn(cols * steps, generator=gen), torch.rand(cols * steps, generator=gen) + 0.5
        x, g = x.to(torch.bfloat16), g.to(torch.bfloat16)
        word_sums = w.view(torch.int32).sum(1, dtype=torch.int64)
        want = {0: ((word_sums + 2**31) % 2**32 - 2**31).double(),  # the kernel's int32 sums wrap
                1: w.double() @ (x.double() * g.double())}
        out = torch.empty(2 * rows, device=device)
        for mode in range(len(INT8_MODES)):
            int8_rows(w.to(device), x.to(device), g.to(device), out, shape, mode)
            ref = want[mode]
            err = ((out.cpu().double() - ref).norm() / ref.norm()).item()
            if not err < (1e-6 if mode == 0 else 3e-4):
                raise AssertionError(f"int8 {INT8_MODES[mode]} {shape}: rel_err {err:.2e}")


def int8_parts():
    check_int8_rows("cuda")
    total = int(FOOTPRINT_MB * MB)
    buf = torch.randint(-127, 128, (total,), device="cuda", dtype=torch.int8)
    out = torch.empty(2**20, device="cuda", dtype=torch.float32)
    for shape in INT8_SHAPES:
        warps, rows, cols, steps = shape
        D = cols * steps
        x = torch.randn(D, device="cuda", dtype=torch.bfloat16)
        g = torch.rand(D, device="cuda", dtype=torch.bfloat16) + 0.5
        for size_mb in INT8_SIZES_MB:
            n_rows = int(size_mb * MB) // D // rows * rows
            n_calls = total // (n_rows * D)
            mats = [buf[i * n_rows * D:(i + 1) * n_rows * D].view(n_rows, D) for i in range(n_calls)]
            times = []
            for mode in range(len(INT8_MODES)):
                us = per_call_us(lambda i: int8_rows(mats[i], x, g, out, shape, mode), n_calls)
                times.append(f"{INT8_MODES[mode]} {us:6.2f}")
            print(f"int8 warps {warps} tile {rows}x{cols} x {steps} steps, {size_mb:4.1f} MB "
                  f"({n_rows // rows} programs): " + ", ".join(times) + " us", flush=True)


def launch_us(buf, out, shape, size_mb):
    warps, rows, cols, steps = shape
    per_program = rows * cols * steps  # elements
    programs = size_mb * MB // (2 * per_program)
    n, n_calls = programs * per_program, FOOTPRINT_MB // size_mb

    def stream(i):
        _stream[(programs,)](buf[i * n:], out, ROWS=rows, COLS=cols, STEPS=steps, num_warps=warps)
    return per_call_us(stream, n_calls), programs


def main():
    if "--int8" in sys.argv[1:]:
        print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
        return int8_parts()
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
