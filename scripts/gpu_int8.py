"""GPU check and timing of the int8 weight-only kernels (kernels/gemv.py, the int8 mode of
kernels/cats_mlp.py) at the Llama-2-7B shapes:
  1. every kernel against its torch reference (bf16; fp16 / fp32 spot checks), the CATS MLP with
     its scratch poisoned (NaN / -1) and with per-neuron thresholds, the ops compiled with CUDA
     graphs;
  2. time, each call captured in a CUDA graph and rotating over enough weight copies that L2
     (50 MB on the H200) holds none of them: the int8 GEMV against bf16 cuBLAS of the same shape;
     the int8 CATS MLP at s = 0, 0.5, 0.7 against the int8 dense MLP (the int8 GEMV three times)
     and the bf16 cuBLAS dense MLP. GB/s counts the bytes read, scales included.
`--sweep` also tries tilings of the GEMV and prints the best (the CATS MLP's one-token tiles:
scripts/gpu_sparse.py --sweep).
    python3 scripts/gpu_int8.py [--sweep] | --float-gemv | --gated
Every section runs even if one before it failed; the exit code says whether all checks passed.
"""
import argparse
import dataclasses
import importlib
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, as for bench.py
from catsgen.kernels import (cats_mlp, cats_mlp_reference, int8_gemv, int8_gemv_reference,  # noqa: E402
                             prepare_workspaces)
from catsgen.kernels import mlp_tiles  # noqa: E402
from catsgen.kernels.bench import dense_mlp_wdown, graph_time_us, int8_dense_mlp  # noqa: E402
from catsgen.quantize import quantize_int8  # noqa: E402

cm = importlib.import_module("catsgen.kernels.cats_mlp")  # the modules, not the ops of the same name
gm = importlib.import_module("catsgen.kernels.gemv")
DEV = "cuda"  # a CPU smoke run of the checks (tiny shapes, interpreter) sets it to "cpu"
D, FF = 4096, 11008
GEMV_SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)}
L2_BYTES = 200 * 2**20  # weights rotated per timed call: 4x the H200's L2
FAILED = []


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(name, err, tol, extra_ok=True):
    ok = extra_ok and err < tol
    if not ok:
        FAILED.append(name)
    print(f"check {name}: rel_err={err:.2e} {'OK' if ok else 'FAIL'}")


def quantized(n, k, dtype=torch.bfloat16):
    """A random float weight [n, k] in dtype and its int8 (q, scale)."""
    w = (torch.randn(n, k, device=DEV) / k**0.5).to(dtype)
    return (w, *quantize_int8(w))


def int8_mlp():
    """(float weights gate, up, down [D, FF]), (q_gate, q_up, q_down_t), scales, q_down [D, FF]."""
    (wg, qg, sg), (wu, qu, su), (wd, qd, sd) = quantized(FF, D), quantized(FF, D), quantized(D, FF)
    return (wg, wu, wd), (qg, qu, qd.t().contiguous()), (sg, su, sd), qd


def threshold(x, q_gate, s_gate, s):
    v = F.silu((x.float() @ q_gate.float().t()) * s_gate).abs()
    t = -1.0 if s == 0 else float("inf") if s == 1 else torch.quantile(v.flatten(), s).item()
    return torch.tensor(t, device=DEV), (v > t).any(0).float().mean().item()


def check_kernels():
    for name, (n, k) in GEMV_SHAPES.items():
        _, q, scale = quantized(n, k)
        for B, dt in ((1, torch.bfloat16), (4, torch.bfloat16), (8, torch.bfloat16), (3, torch.float16),
                      (2, torch.float32)):
            x = torch.randn(B, k, device=DEV, dtype=dt)
            y = int8_gemv(x, q, scale)
            check(f"int8_gemv {name} {n}x{k} B={B} {dt}", rel_err(y, int8_gemv_reference(x, q, scale)),
                  1e-4 if dt == torch.float32 else 1e-2, y.dtype == dt and not y.isnan().any())
        x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
        y = gm.int8_gemv_triton(x, q, scale, gm.GemvBlocks(split_k=2))
        check(f"int8_gemv {name} split_k=2", rel_err(y, int8_gemv_reference(x, q, scale)), 1e-2)

    real_empty = cm._empty  # poisoned scratch: every output must be written
    cm._empty = lambda *a, dtype, **k: torch.full(a, float("nan") if dtype.is_floating_point else -1, dtype=dtype, **k)
    try:
        _, qs, scales, _ = int8_mlp()
        for B, s, dt in ((1, 0.5, torch.bfloat16), (1, 0, torch.bfloat16), (4, 0.7, torch.bfloat16),
                         (8, 0.9, torch.bfloat16), (1, 1.0, torch.bfloat16), (3, 0.5, torch.float16),
                         (1, 0.5, torch.float32)):
            x = torch.randn(B, D, device=DEV, dtype=dt)
            t, _ = threshold(x, qs[0], scales[0], s)
            y = cats_mlp(x, *qs, t, scales=scales)
            ok = y.dtype == dt and not y.isnan().any() and (s < 1 or bool((y == 0).all()))
            err = 0.0 if s == 1 else rel_err(y, cats_mlp_reference(x, *qs, t, scales=scales))
            # fp32, one token: the int8 -> fp32 offset (tiles.int8_to_f32_offset) leaves ~1e-4
            check(f"int8 cats_mlp B={B} s={s} {dt}", err, 3e-4 if dt == torch.float32 else 1e-2, ok)
        fma = mlp_tiles.pick_blocks(1, int8=True)
        for s, weights in ((0.5, "int8"), (0.7, "bf16"), (0.0, "int8")):  # B = 1 on the FMA units
            x = torch.randn(1, D, device=DEV, dtype=torch.bfloat16)
            t, _ = threshold(x, qs[0], scales[0], s)
            if weights == "int8":
                y, ref = (cm.cats_mlp_triton(x, *qs, t, blocks=fma, scales=scales),
                          cats_mlp_reference(x, *qs, t, scales=scales))
            else:
                ws = [torch.randn(FF, D, device=DEV, dtype=torch.bfloat16) / D**0.5
                      for _ in range(3)]
                y, ref = (cm.cats_mlp_triton(x, *ws, t, blocks=dataclasses.replace(cm.Blocks(), fma_at_b1=True)),
                          cats_mlp_reference(x, *ws, t))
            check(f"{weights} cats_mlp FMA B=1 s={s}", rel_err(y, ref), 1e-2, not y.isnan().any())
        x = torch.randn(2, D, device=DEV, dtype=torch.bfloat16)
        t = torch.rand(FF, device=DEV) * 0.1  # per-neuron thresholds
        check("int8 cats_mlp per-neuron t", rel_err(cats_mlp(x, *qs, t, scales=scales),
                                                   cats_mlp_reference(x, *qs, t, scales=scales)), 1e-2)
        worst = max(rel_err(cats_mlp(x, *qs, t, scales=scales), cats_mlp_reference(x, *qs, t, scales=scales))
                    for t in (torch.rand((), device=DEV) * 0.2 for _ in range(50)))
        check("int8 cats_mlp 50 calls, random t", worst, 1e-2, cm.list_counter(DEV)[0].item() == 0)
    finally:
        cm._empty = real_empty


def check_compiled():
    """Both ops inside one compiled step with CUDA graphs, as the model will use them."""
    prepare_workspaces(DEV, 1, 32)  # before any capture, as setup_caches does
    _, qs, scales, _ = int8_mlp()
    _, qo, so = quantized(D, D)
    x = torch.randn(1, D, device=DEV, dtype=torch.bfloat16)
    step = torch.compile(lambda x, t: x + cats_mlp(int8_gemv(x, qo, so), *qs, t, scales=scales),
                         fullgraph=True, mode="reduce-overhead")
    for tv in (0.05, 0.1):
        t = torch.tensor(tv, device=DEV)
        for _ in range(3):
            out = step(x, t)
        ref = x.float() + cats_mlp_reference(int8_gemv_reference(x, qo, so), *qs, t, scales=scales).float()
        check(f"compiled step t={tv}", rel_err(out, ref), 1e-2)


def rotated_time_us(make_call, nbytes):
    """Time of one call, rotating over copies of the weights (make_call() -> a call on a fresh copy)."""
    copies = max(2, -(-L2_BYTES // nbytes))
    calls = [make_call() for _ in range(copies)]

    def all_copies():
        for call in calls:
            call()
    return graph_time_us(all_copies, calls=max(1, 24 // copies), replays=15) / copies


def gemv_call(n, k, B, int8_blocks=None):
    """A maker of calls on fresh weights: the int8 GEMV with int8_blocks, or bf16 cuBLAS (None)."""
    def make():
        w, q, scale = quantized(n, k)
        x = torch.randn(B, k, device=DEV, dtype=torch.bfloat16)
        return (lambda: gm.int8_gemv_triton(x, q, scale, int8_blocks)) if int8_blocks else (lambda: F.linear(x, w))
    return make


def time_gemv(sweep):
    print(f"\n{'gemv':>8} {'shape':>11} {'B':>2} {'int8_us':>8} {'GB/s':>6} {'bf16_us':>8} {'GB/s':>6} {'speedup':>7}")
    for name, (n, k) in GEMV_SHAPES.items():
        best = gm.pick_gemv_blocks(n, k)
        if sweep:  # the best tiles serve the rest of the run (the int8 dense MLP too)
            best = gm.TUNED_GEMV_BLOCKS[n, k] = sweep_gemv(n, k)
        for B in (1, 4):
            i8 = rotated_time_us(gemv_call(n, k, B, best if B == 1 else gm.pick_gemv_blocks(n, k, B)), n * k)
            bf = rotated_time_us(gemv_call(n, k, B), 2 * n * k)
            i8_bytes, bf_bytes = n * k + 4 * n, 2 * n * k
            print(f"{name:>8} {n:>5}x{k:<5} {B:>2} {i8:>8.1f} {i8_bytes / i8 / 1e3:>6.0f} {bf:>8.1f} "
                  f"{bf_bytes / bf / 1e3:>6.0f} {bf / i8:>6.2f}x")


def gemv_candidates(k):
    """B = 1 tilings tried by --sweep: FMA rows (few rows, long int8 steps, the int8_to_f32
    conversion), each step's products summed over 16-column runs first (sub=16: a smaller
    accumulator, more programs an SM) or not, with one and more pipeline stages."""
    fma = [(2, 1024, 2, 1), (2, 1024, 2, 2), (2, 1024, 4, 1), (2, 2048, 4, 1), (1, 4096, 4, 1), (4, 1024, 4, 1),
           (4, 1024, 4, 2), (4, 1024, 4, 3), (4, 2048, 4, 1), (4, 512, 2, 2), (8, 1024, 4, 1), (8, 1024, 8, 1),
           (8, 512, 4, 2), (16, 512, 4, 1), (4, 1024, 2, 2),
           # one warp a program: what sped up the int8 CATS down launch (notes/kernels.md v11)
           (2, 512, 1, 1), (4, 512, 1, 1), (2, 1024, 1, 1), (1, 1024, 1, 1)]
    tries = [gm.GemvBlocks(n, bk, 1, (w, st), True, sub=16) for n, bk, w, st in fma if bk <= k]
    tries += [gm.GemvBlocks(n, bk, 1, (w, st), True) for n, bk, w, st in fma[:8] if bk <= k]
    return tries


def sweep_gemv(n, k):
    base = gm.pick_gemv_blocks(n, k)
    tries = [base] + [b for b in gemv_candidates(k) if b != base]
    times = {}
    for b in tries:
        try:
            times[b] = rotated_time_us(gemv_call(n, k, 1, b), n * k)
        except Exception as e:  # a tiling the compiler refuses (registers, shared memory) is skipped
            print(f"sweep gemv {n}x{k} {b}: {type(e).__name__}")
    best = min(times, key=times.get)
    for b, us in sorted(times.items(), key=lambda item: item[1]):
        print(f"sweep gemv {n}x{k} B=1: {us:6.1f} us {n * k / us / 1e3:6.0f} GB/s {b}")
    print(f"sweep gemv {n}x{k} B=1: base {times[base]:.1f} us, BEST {times[best]:.1f} us {best}")
    return best


def float_gemv_call(n, k, blocks, residual=False):
    """A maker of calls: the GEMV kernel reading bf16 weights with `blocks` (and the residual added,
    as the model's decode runs W_o): whether a Triton GEMV beats cuBLAS for the float projections."""
    def make():
        w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16)
        x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
        res = torch.randn(1, n, device=DEV, dtype=torch.bfloat16) if residual else None
        return lambda: gm.gemv_triton(x, w, residual=res, blocks=blocks)
    return make


def sweep_float_gemv():
    """bf16 weights, B = 1: cuBLAS (F.linear) against the Triton FMA GEMV over a few tilings."""
    tiles = [(1, 1024, 4, 1), (2, 512, 4, 2), (2, 1024, 4, 1), (4, 512, 4, 2), (4, 256, 4, 3), (4, 512, 8, 2),
             (8, 256, 4, 2), (8, 512, 8, 2), (2, 512, 2, 3), (4, 1024, 8, 1), (16, 128, 4, 3)]
    tiles = [(t, 0) for t in tiles] + [(t, 8) for t in tiles[:6] + [(2, 1024, 2, 2), (4, 1024, 4, 2), (8, 512, 4, 2)]]
    print(f"\n{'float':>8} {'shape':>11} {'cuBLAS_us':>9} {'GB/s':>6} {'best_us':>8} {'GB/s':>6} best tiles")
    for name, (n, k) in GEMV_SHAPES.items():
        cublas = rotated_time_us(gemv_call(n, k, 1), 2 * n * k)
        times = {}
        for (bn, bk, w, st), sub in tiles:
            b = gm.GemvBlocks(bn, bk, 1, (w, st), True, magic=False, sub=sub)
            try:
                times[b] = rotated_time_us(float_gemv_call(n, k, b), 2 * n * k)
            except Exception as e:  # a tiling the compiler refuses is skipped
                print(f"float gemv {n}x{k} {b}: {type(e).__name__}")
        best = min(times, key=times.get)
        print(f"{name:>8} {n:>5}x{k:<5} {cublas:>9.1f} {2 * n * k / cublas / 1e3:>6.0f} {times[best]:>8.1f} "
              f"{2 * n * k / times[best] / 1e3:>6.0f} {best}")
        chosen = gm.pick_gemv_blocks(n, k, 1, int8=False)
        folded = {f"{label}": rotated_time_us(float_gemv_call(n, k, chosen, **kw), 2 * n * k)
                  for label, kw in (("plain", {}), ("residual", dict(residual=True)))}
        print("   chosen tiles: " + ", ".join(f"{label} {t:.1f}" for label, t in folded.items()))
        print("   all: " + ", ".join(f"{b.block_n}x{b.block_k}/{b.warps_and_stages}/sub{b.sub}: {t:.1f}"
                                   for b, t in times.items()))


GATED_TILES = {False: [(2, 1024, 4, 1, 8), (2, 512, 4, 2, 0), (2, 1024, 4, 2, 8), (4, 1024, 4, 1, 8), (2, 512, 4, 2, 8),
                        (1, 1024, 4, 1, 8), (2, 1024, 2, 1, 8)],
               True: [(2, 1024, 2, 1, 0), (2, 1024, 2, 1, 16), (4, 512, 2, 2, 16), (4, 1024, 4, 1, 16), (2, 1024, 2, 2, 16),
                      (4, 512, 2, 1, 16), (2, 2048, 4, 1, 16), (2, 1024, 4, 1, 16), (1, 2048, 2, 1, 16), (4, 512, 4, 2, 16)]}


def time_gated(sweep=False):
    """The dense MLP's first half, B = 1, 4096 -> 11008: the gated GEMV (one launch writing
    SiLU(g) * u) against what it replaces: bf16 cuBLAS gate + up + a compiled SiLU*up, and two int8
    GEMVs + the same SiLU*up; with a check of each gated result. sweep: the gated launch's tiles too."""
    silu_mul = torch.compile(lambda g, u: F.silu(g) * u)
    print(f"\n{'gated':>8} {'weights':>7} {'unfused_us':>10} {'gated_us':>9} {'GB/s':>6} rel_err")
    for int8 in (False, True):
        def make(fused, blocks=None):
            (wg, qg, sg), (wu, qu, su) = quantized(FF, D), quantized(FF, D)
            x = torch.randn(1, D, device=DEV, dtype=torch.bfloat16)
            if fused:
                w, s, up = (qg, sg, (qu, su)) if int8 else (wg, None, (wu, None))
                return lambda: gm.gemv_triton(x, w, s, up=up, blocks=blocks)
            if int8:
                return lambda: silu_mul(gm.int8_gemv_triton(x, qg, sg), gm.int8_gemv_triton(x, qu, su))
            return lambda: silu_mul(F.linear(x, wg), F.linear(x, wu))
        nbytes = 2 * FF * D * (1 if int8 else 2)
        unfused, gated = (rotated_time_us(lambda fused=fused: make(fused), nbytes) for fused in (False, True))
        (wg, qg, sg), (wu, qu, su) = quantized(FF, D), quantized(FF, D)
        x = torch.randn(1, D, device=DEV, dtype=torch.bfloat16)
        ref = gm.gemv_reference(x, qg, sg, up=(qu, su)) if int8 else gm.gemv_reference(x, wg, up=(wu, None))
        out = gm.gemv_triton(x, qg, sg, up=(qu, su)) if int8 else gm.gemv_triton(x, wg, up=(wu, None))
        print(f"{'gate/up':>8} {'int8' if int8 else 'bf16':>7} {unfused:>10.1f} {gated:>9.1f} "
              f"{nbytes / gated / 1e3:>6.0f} {rel_err(out, ref):.1e}")
        for bn, bk, w, st, sub in GATED_TILES[int8] if sweep else ():
            b = gm.GemvBlocks(bn, bk, 1, (w, st), True, magic=int8, sub=sub)
            try:
                us = rotated_time_us(lambda: make(True, b), nbytes)
                w, s, up = (qg, sg, (qu, su)) if int8 else (wg, None, (wu, None))
                err = rel_err(gm.gemv_triton(x, w, s, up=up, blocks=b), ref)
            except Exception as e:  # a tiling the compiler refuses is skipped
                print(f"   gated {'int8' if int8 else 'bf16'} {b}: {type(e).__name__}")
                continue
            print(f"   gated {'int8' if int8 else 'bf16'} {us:6.1f} us {nbytes / us / 1e3:6.0f} GB/s rel_err {err:.1e} {b}")


def time_mlp():
    int8_blocks = mlp_tiles.pick_blocks(1, int8=True)  # their sweep: scripts/gpu_sparse.py --sweep
    print(f"\nint8 CATS MLP {D}x{FF}, blocks {int8_blocks}; int8 dense MLP: the int8 GEMV with "
          f"{gm.pick_gemv_blocks(FF, D)} (gate, up), {gm.pick_gemv_blocks(D, FF)} (down)")
    print(f"{'B':>2} {'s':>4} {'active':>6} {'cats_us':>8} {'GB/s':>6} {'limit':>6} {'i8dense':>8} {'vs_i8':>6} "
          f"{'bf16':>8} {'vs_bf16':>7}")
    copies = 2  # 2 x 135 MB of int8 MLP weights
    mlps = [int8_mlp() for _ in range(copies)]
    f, d = FF, D
    dense_bytes = 3 * f * d + 8 * f + 4 * d
    for B in (1, 4):
        xs = [torch.randn(B, d, device=DEV, dtype=torch.bfloat16) for _ in range(copies)]

        def timed(fn):
            def all_copies():
                for i in range(copies):
                    fn(i)
            return graph_time_us(all_copies, calls=12, replays=15) / copies
        i8_dense = timed(lambda i: int8_dense_mlp(xs[i], *mlps[i][1][:2], mlps[i][3], *mlps[i][2]))
        bf16 = timed(lambda i: dense_mlp_wdown(xs[i], *mlps[i][0]))
        for s in (0, 0.5, 0.7):
            ts = [threshold(xs[i], mlps[i][1][0], mlps[i][2][0], s) for i in range(copies)]
            active = ts[0][1]
            us = timed(lambda i: cm.cats_mlp_triton(xs[i], *mlps[i][1], ts[i][0], blocks=int8_blocks,
                                                    scales=mlps[i][2]))
            needed = f * d + 4 * f + active * f * (2 * d + 4) + 4 * d
            print(f"{B:>2} {s:>4.2f} {active:>6.3f} {us:>8.1f} {needed / us / 1e3:>6.0f} {dense_bytes / needed:>5.2f}x "
                  f"{i8_dense:>8.1f} {i8_dense / us:>5.2f}x {bf16:>8.1f} {bf16 / us:>6.2f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", action="store_true",
                   help="also try a few tilings of the GEMV")
    p.add_argument("--float-gemv", action="store_true", help="only: bf16 weights, Triton GEMV vs cuBLAS")
    p.add_argument("--gated", action="store_true", help="only: the gated GEMV's tiles, bf16 and int8")
    a = p.parse_args()
    if a.gated:
        time_gated(sweep=True)
        return
    if a.float_gemv:
        sweep_float_gemv()
        time_gated()
        return
    print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())
    for section in (check_kernels, check_compiled, lambda: time_gemv(a.sweep), time_mlp):
        try:
            section()
        except Exception:  # report and go on: one run on the device must give every answer it can
            traceback.print_exc()
            FAILED.append(getattr(section, "__name__", "section"))
        torch.cuda.empty_cache()
    print("ALL CHECKS PASSED" if not FAILED else f"FAILED: {FAILED}")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
