"""int8 weights for one token through tl.dot, the weights converted to fp16 two at an instruction
(tiles.int8_to_f16), against the FMA path (int8 -> fp32, fma_at_b1): the int8 GEMV at the
Llama-2-7B shapes and the CATS MLP (norm folded in) at s = 0.5 and 0.7, each candidate checked
against its torch reference first. Prints one line per candidate and the best of each.
    python3 scripts/gpu_int8_dot.py
"""
import dataclasses
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gpu_int8 as gi  # noqa: E402
import gpu_sparse as gs  # noqa: E402
from catsgen.kernels import cats_mlp_reference, prepare_workspaces  # noqa: E402
from catsgen.kernels.bench import graph_time_us  # noqa: E402

cm, gm = gs.cm, gi.gm

GEMV_DOT = [gm.GemvBlocks(n, k, 1, (w, st)) for n, k, w, st in (
    (16, 256, 4, 3), (16, 512, 4, 3), (32, 256, 4, 3), (32, 512, 4, 4), (64, 256, 4, 3), (64, 128, 4, 4),
    (32, 256, 2, 3), (16, 1024, 4, 2), (32, 128, 4, 4), (64, 256, 8, 3))]
MLP_DOT = [dataclasses.replace(cm.INT8_BLOCKS, **c) for c in (
    {}, dict(gate_f=16, gate_d=256), dict(gate_f=64, gate_d=128), dict(gate_f=32, gate_d=256, gate_stages=3),
    dict(up_r=16, up_d=256, up_steps=4), dict(up_r=32, up_d=128, up_steps=8), dict(up_r=64, up_d=128, up_steps=4),
    dict(down_r=32, down_d=128, down_steps=2), dict(down_r=64, down_d=256, down_steps=1), dict(stages=3),
    dict(warps=8))]


def gemv_rows():
    for n, k in gi.GEMV_SHAPES.values():
        w, q, s = gi.quantized(n, k)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = gm.int8_gemv_reference(x, q, s).float()
        times = {}
        for b in [gm.pick_gemv_blocks(n, k)] + GEMV_DOT:
            try:
                err = gi.rel_err(gm.int8_gemv_triton(x, q, s, b).float(), ref)
                assert err < 1e-2, f"rel_err {err:.1e}"
                times[b] = gi.rotated_time_us(gi.gemv_call(n, k, 1, b), n * k)
            except Exception as e:  # a tiling the compiler refuses is skipped
                print(f"gemv {n}x{k} {b}: {type(e).__name__} {str(e)[:80]}")
                continue
            print(f"gemv {n}x{k} {times[b]:6.1f} us {(n * k + 4 * n) / times[b] / 1e3:5.0f} GB/s {b}", flush=True)
        fma = times.get(gm.pick_gemv_blocks(n, k))
        best = min(times, key=times.get)
        print(f"GEMV {n}x{k}: FMA {fma:.1f} us, best {times[best]:.1f} us {best}", flush=True)


def mlp_call(case, cfg, s, i):
    copies, x, norm, ts = case
    ws, scales = copies[i]
    return cm.cats_mlp_triton(x, *ws, ts[s][i], blocks=cfg, scales=scales, norm=norm)


def mlp_rows():
    case = gs.make_case("int8")
    copies, x, norm, ts = case
    results = {}
    for cfg in [cm.pick_blocks(1, int8=True)] + MLP_DOT:
        try:
            for s in gs.SPARSITIES:
                ref = cats_mlp_reference(x, *copies[0][0], ts[s][0], copies[0][1], norm).float()
                err = gi.rel_err(mlp_call(case, cfg, s, 0).float(), ref)
                assert err < 5e-2, f"rel_err {err:.1e}"
            t = {s: graph_time_us(lambda: [mlp_call(case, cfg, s, i) for i in range(gs.COPIES)], calls=10) / gs.COPIES
                 for s in gs.SPARSITIES}
        except Exception as e:
            print(f"mlp {cfg}: {type(e).__name__} {str(e)[:80]}")
            continue
        results[cfg] = t
        print(f"mlp s=0.5 {t[0.5]:5.1f} us, s=0.7 {t[0.7]:5.1f} us {cfg}", flush=True)
    best = min(results, key=lambda c: sum(results[c].values()))
    print(f"MLP: FMA {results.get(cm.pick_blocks(1, int8=True))}, best {results[best]} {best}", flush=True)


if __name__ == "__main__":
    prepare_workspaces("cuda", 1, 1)
    print(torch.cuda.get_device_name(), torch.__version__)
    gemv_rows()
    mlp_rows()
