"""Kernel benchmark: cats_mlp against the dense cuBLAS MLP, both timed as CUDA-graph replays.

    python -m catsgen.kernels.bench [--shapes 4096x11008,4096x14336] [--batch 1,4] [--sparsity 0,0.5]
                                    [--weights bf16,int8]

x is random; the threshold for sparsity s is the s-quantile of |SiLU(W_gate x)| for that x, so the
fraction skipped matches s. 'active' is the fraction of neurons any token in the batch needs (the
rows of W_up / W_down actually read). GB/s counts the bytes needed: gate in full, up and down for
active rows. 'limit' is the byte ratio dense / needed, the best speedup possible.
'dense' is the faster of the model's dense paths (cuBLAS; for one token also the gated GEMV for
gate and up, then cuBLAS). int8 rows: weights quantized per output channel (catsgen/quantize.py);
'dense' is then the model's int8 dense MLP (the gated GEMV, then the GEMV of W_down), and the
bytes count the fp32 scales read.
"""
import argparse
import statistics

import torch
import torch.nn.functional as F

from ..quantize import quantize_int8
from .cats_mlp import cats_mlp, cats_mlp_reference
from .gemv import gemv

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


def gated_dense_mlp(x, w_gate, w_up, w_down_t):  # the model's dense MLP for one token
    return gemv(x, w_gate, up=(w_up, None)) @ w_down_t


def int8_dense_mlp(x, q_gate, q_up, q_down, s_gate, s_up, s_down):
    """The dense MLP on int8 weights (q_down [d, f], as checkpoints store W_down), as the model runs
    it: the gated GEMV (gate and up), then the GEMV of W_down."""
    return gemv(gemv(x, q_gate, s_gate, up=(q_up, s_up)), q_down, s_down)


def _mlp_setup(x, w_gate, w_up, w_down_t, w_down, int8):
    """(weights for cats_mlp, its scales or None, the dense MLP to beat as a call, bytes of a dense row)."""
    if not int8:
        dense_paths = [lambda: dense_mlp(x, w_gate, w_up, w_down_t), lambda: dense_mlp_wdown(x, w_gate, w_up, w_down)]
        if x.shape[0] == 1:  # the model's one-token dense path
            dense_paths.append(lambda: gated_dense_mlp(x, w_gate, w_up, w_down_t))
        dense_us = min(graph_time_us(call) for call in dense_paths)
        return (w_gate, w_up, w_down_t), None, dense_us, w_gate.shape[1] * w_gate.element_size()
    (qg, sg), (qu, su), (qd, sd) = quantize_int8(w_gate), quantize_int8(w_up), quantize_int8(w_down)
    dense_us = graph_time_us(lambda: int8_dense_mlp(x, qg, qu, qd, sg, su, sd))
    return (qg, qu, qd.t().contiguous()), (sg, su, sd), dense_us, qg.shape[1] + 4  # + a row's fp32 scale


def _rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def run_kernel_bench(shapes=None, batch_sizes=(1, 4), sparsities=(0, 0.3, 0.5, 0.7, 0.9),
                     dtype=torch.bfloat16, mlp=cats_mlp, weights=("bf16", "int8")) -> list[dict]:
    """One row per (weights, shape, B, s). `mlp` lets a caller time another variant with the same
    signature (its int8 rows get scales=). weights: "bf16" (dtype's weights) and / or "int8"."""
    if not torch.cuda.is_available():
        raise RuntimeError("the kernel benchmark needs a CUDA GPU")
    rows = []
    for kind in weights:
        for d, f in shapes or SHAPES:
            gen = torch.Generator(device="cuda").manual_seed(0)
            w_gate, w_up, w_down_t = (torch.randn(f, d, device="cuda", generator=gen, dtype=dtype) / d**0.5
                                      for _ in range(3))
            w_down = w_down_t.t().contiguous()
            for B in batch_sizes:
                x = torch.randn(B, d, device="cuda", generator=gen, dtype=dtype)
                ws, scales, dense_us, row_bytes = _mlp_setup(x, w_gate, w_up, w_down_t, w_down, kind == "int8")
                extra = dict(scales=scales) if scales else {}
                v = F.silu(x.float() @ w_gate.float().t()).abs()
                for s in sparsities:
                    t = torch.tensor(-1.0 if s == 0 else torch.quantile(v.flatten(), s).item(), device="cuda")
                    active = (v > t).any(0).float().mean().item()
                    err = _rel_err(mlp(x, *ws, t, **extra), cats_mlp_reference(x, *ws, t, **extra))
                    us = graph_time_us(lambda: mlp(x, *ws, t, **extra))
                    needed = f * row_bytes * (1 + 2 * active) + (4 * d if scales else 0)  # + W_down's scales
                    rows.append(dict(weights=kind, shape=f"{d}x{f}", B=B, s=s, active=active, us=us,
                                     dense_us=dense_us, speedup=dense_us / us, limit=3 * f * row_bytes / needed,
                                     gbps=needed / us / 1e3, err=err))
            del w_gate, w_up, w_down_t, w_down
    return rows


def format_table(rows) -> str:
    head = f"{'weights':>7} {'shape':>11} {'B':>2} {'s':>4} {'active':>6} {'cats_us':>8} {'dense_us':>8} " \
           f"{'speedup':>7} {'limit':>6} {'GB/s':>6} {'rel_err':>8}"
    lines = [head] + [
        f"{r['weights']:>7} {r['shape']:>11} {r['B']:>2} {r['s']:>4.2f} {r['active']:>6.3f} {r['us']:>8.1f} "
        f"{r['dense_us']:>8.1f} "
        f"{r['speedup']:>6.2f}x {r['limit']:>5.2f}x {r['gbps']:>6.0f} {r['err']:>8.1e}" for r in rows]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(f"{d}x{f}" for d, f in SHAPES), help="dxf,dxf,...")
    p.add_argument("--batch", default="1,4")
    p.add_argument("--sparsity", default="0,0.3,0.5,0.7,0.9")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--weights", default="bf16,int8", help="bf16 (the --dtype weights) and / or int8")
    a = p.parse_args()
    shapes = [tuple(int(n) for n in s.split("x")) for s in a.shapes.split(",")]
    rows = run_kernel_bench(shapes, [int(b) for b in a.batch.split(",")],
                            [float(s) for s in a.sparsity.split(",")], getattr(torch, a.dtype),
                            weights=a.weights.split(","))
    print(f"{torch.cuda.get_device_name()}, {a.dtype}, CUDA-graph timed, median")
    print(format_table(rows))


if __name__ == "__main__":
    main()
