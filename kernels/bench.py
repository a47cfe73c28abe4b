"""Kernel benchmark: cats_mlp against the dense cuBLAS MLP, both timed as CUDA-graph replays.

    python -m catsgen.kernels.bench [--shapes 4096x11008,4096x14336] [--batch 1,4] [--sparsity 0,0.5]

x is random; the threshold for sparsity s is the s-quantile of |SiLU(W_gate x)| for that x, so the
fraction skipped matches s. 'active' is the fraction of neurons any token in the batch needs (the
rows of W_up / W_down actually read). GB/s counts the bytes needed: gate in full, up and down for
active rows. 'limit' is the byte ratio dense / needed, the best speedup possible.
"""
import argparse
import statistics

import torch
import torch.nn.functional as F

from .cats_mlp import cats_mlp, cats_mlp_reference

SHAPES = ((4096, 11008), (4096, 14336))  # (d, f): Llama-2-7B, Mistral-7B


def graph_time_us(fn, calls=50, replays=15):
    """Median time of one call of fn: `calls` calls captured in one CUDA graph, replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: Triton compile, cuBLAS handles
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def dense_mlp(x, w_gate, w_up, w_down_t):
    return (F.silu(F.linear(x, w_gate)) * F.linear(x, w_up)) @ w_down_t


def dense_mlp_wdown(x, w_gate, w_up, w_down):  # W_down in its [d, f] layout, as checkpoints store it
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def _rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def run_kernel_bench(shapes=None, batch_sizes=(1, 4), sparsities=(0, 0.3, 0.5, 0.7, 0.9),
                     dtype=torch.bfloat16, mlp=cats_mlp) -> list[dict]:
    """One row per (shape, B, s). `mlp` lets a caller time another variant with the same signature."""
    if not torch.cuda.is_available():
        raise RuntimeError("the kernel benchmark needs a CUDA GPU")
    rows = []
    for d, f in shapes or SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(0)
        w_gate, w_up, w_down_t = (torch.randn(f, d, device="cuda", generator=gen, dtype=dtype) / d**0.5
                                  for _ in range(3))
        w_down = w_down_t.t().contiguous()
        for B in batch_sizes:
            x = torch.randn(B, d, device="cuda", generator=gen, dtype=dtype)
            dense_us = min(graph_time_us(lambda: dense_mlp(x, w_gate, w_up, w_down_t)),
                           graph_time_us(lambda: dense_mlp_wdown(x, w_gate, w_up, w_down)))
            v = F.silu(x.float() @ w_gate.float().t()).abs()
            for s in sparsities:
                t = torch.tensor(-1.0 if s == 0 else torch.quantile(v.flatten(), s).item(), device="cuda")
                active = (v > t).any(0).float().mean().item()
                err = _rel_err(mlp(x, w_gate, w_up, w_down_t, t), cats_mlp_reference(x, w_gate, w_up, w_down_t, t))
                us = graph_time_us(lambda: mlp(x, w_gate, w_up, w_down_t, t))
                needed = d * f * w_gate.element_size() * (1 + 2 * active)
                rows.append(dict(shape=f"{d}x{f}", B=B, s=s, active=active, us=us, dense_us=dense_us,
                                 speedup=dense_us / us, limit=3 / (1 + 2 * active), gbps=needed / us / 1e3,
                                 err=err))
        del w_gate, w_up, w_down_t, w_down
    return rows


def format_table(rows) -> str:
    head = f"{'shape':>11} {'B':>2} {'s':>4} {'active':>6} {'cats_us':>8} {'dense_us':>8} {'speedup':>7} " \
           f"{'limit':>6} {'GB/s':>6} {'rel_err':>8}"
    lines = [head] + [
        f"{r['shape']:>11} {r['B']:>2} {r['s']:>4.2f} {r['active']:>6.3f} {r['us']:>8.1f} {r['dense_us']:>8.1f} "
        f"{r['speedup']:>6.2f}x {r['limit']:>5.2f}x {r['gbps']:>6.0f} {r['err']:>8.1e}" for r in rows]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(f"{d}x{f}" for d, f in SHAPES), help="dxf,dxf,...")
    p.add_argument("--batch", default="1,4")
    p.add_argument("--sparsity", default="0,0.3,0.5,0.7,0.9")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    a = p.parse_args()
    shapes = [tuple(int(n) for n in s.split("x")) for s in a.shapes.split(",")]
    rows = run_kernel_bench(shapes, [int(b) for b in a.batch.split(",")],
                            [float(s) for s in a.sparsity.split(",")], getattr(torch, a.dtype))
    print(f"{torch.cuda.get_device_name()}, {a.dtype}, CUDA-graph timed, median")
    print(format_table(rows))


if __name__ == "__main__":
    main()
