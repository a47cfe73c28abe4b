"""The CATS MLP's launches for one token (Llama-2-7B MLP shape, the block's RMSNorm folded in as the
model runs it), bf16 and int8 weights:
  - per-launch times (torch profiler over eager calls: gate, up, down) at s = 0.5 and 0.7;
  - `--sweep`: tilings tried one launch at a time (coordinate descent), scored by the s = 0.5 plus
    s = 0.7 times of the whole MLP as CUDA-graph replays over two weight copies (L2 holds neither);
  - `--ncu`: only run each candidate's three launches twice (for `ncu --kernel-name regex:...`);
  - `--stress`: 300 calls in a row against their first results (the list's counter left at zero);
  - `--gate`, `--down-warps`: the gate launch with the GEMV's narrow tiles, the down launch with 4
    or 1 warps (per-launch times);
  - `--try down_warps=1 warps=1,up_r=16`: the model's tiles with these Blocks fields changed.
Every candidate is checked against the torch reference first.
    python3 scripts/gpu_sparse.py [--weights bf16 int8] [--sweep] [--ncu] [--stress] [--gate] [--down-warps]
                                  [--try FIELD=INT[,FIELD=INT...] ...]
"""
import argparse
import dataclasses
import importlib
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, as for bench.py
from catsgen.kernels import cats_mlp_reference, prepare_workspaces  # noqa: E402
from catsgen.kernels import mlp_tiles  # noqa: E402
from catsgen.kernels.bench import graph_time_us  # noqa: E402
from catsgen.quantize import quantize_int8  # noqa: E402

cm = importlib.import_module("catsgen.kernels.cats_mlp")
D, FF = 4096, 11008
COPIES = 2
DEV = "cuda"  # a CPU smoke run (interpreter, tiny shapes) sets it to "cpu"
SPARSITIES = (0.5, 0.7)

# one launch's tiles at a time; down: (rows, columns, row steps, fold); up and down share warps
GATE = [dict(gate_f=8, gate_d=512), dict(gate_f=16, gate_d=256), dict(gate_f=16, gate_d=512),
        dict(gate_f=16, gate_d=1024), dict(gate_f=32, gate_d=256), dict(gate_warps=2), dict(gate_warps=8),
        dict(gate_stages=1), dict(gate_stages=3)]
UP = [dict(up_r=r, up_d=d, up_steps=st) for r, d, st in (
    (8, 512, 4), (8, 1024, 2), (8, 1024, 4), (8, 2048, 1), (16, 512, 4), (16, 512, 2), (4, 2048, 2), (4, 1024, 4))]
DOWN = [dict(down_r=r, down_d=d, down_steps=st, down_fold=f) for r, d, st, f in (
    (64, 128, 4, 0), (64, 128, 4, 8), (64, 128, 4, 4), (64, 128, 4, 1), (64, 128, 2, 8), (128, 128, 2, 8),
    (128, 128, 1, 8), (64, 64, 4, 8), (64, 256, 2, 4), (32, 128, 8, 8), (64, 128, 8, 8), (128, 64, 2, 16))]
GATE_NARROW = {"bf16": [(2, 1024, 4, 1), (4, 1024, 4, 1), (4, 512, 2, 2), (8, 512, 2, 2), (8, 1024, 4, 1),
                        (2, 2048, 4, 1), (4, 512, 4, 2)],
               "int8": [(4, 512, 2, 2), (4, 1024, 4, 1), (2, 1024, 2, 1), (8, 512, 2, 2), (8, 1024, 4, 1),
                        (4, 1024, 2, 2), (2, 2048, 4, 1)]}
# warps: the up launch's (and the down launch's where down_warps is 0)
SHARED = [dict(stages=1), dict(stages=2), dict(stages=3), dict(warps=4), dict(warps=1)]
SUBS = [dict(sub=8), dict(sub=16), dict(sub=32)]
# the down launch with its own warps (rows, columns, row steps, fold: one layout period of rows)
DOWN_WARPS = {4: [(64, 128, 4, 16), (128, 128, 2, 16), (64, 128, 2, 16), (128, 64, 2, 16), (32, 128, 8, 16)],
              2: [(64, 128, 4, 8)],
              1: [(64, 128, 4, 4), (32, 128, 4, 4), (32, 128, 8, 4), (32, 128, 2, 4), (16, 128, 8, 4),
                  (32, 64, 4, 4), (32, 256, 4, 4), (32, 128, 4, 8)]}


def make_case(weights):
    """(per copy: (w_gate, w_up, w_down_t), scales or None), x, norm, {s: per-copy thresholds}."""
    copies = []
    for _ in range(COPIES):
        ws = [torch.randn(FF, D, device=DEV, dtype=torch.bfloat16) / D**0.5 for _ in range(3)]
        if weights == "int8":
            (qg, sg), (qu, su), (qd, sd) = (quantize_int8(w) for w in (ws[0], ws[1], ws[2].t().contiguous()))
            copies.append(((qg, qu, qd.t().contiguous()), (sg, su, sd)))
        else:
            copies.append((tuple(ws), None))
    x = torch.randn(1, D, device=DEV, dtype=torch.bfloat16)
    norm = (torch.rand(D, device=DEV, dtype=torch.bfloat16) + 0.5, 1e-5)
    xn = cm.rms_norm_reference(x, *norm).float()
    ts = {}
    for s in SPARSITIES:
        ts[s] = []
        for (wg, _, _), sc in copies:
            g = xn @ wg.float().t() * (sc[0] if sc else 1.0)
            v = F.silu(g).abs().flatten().sort().values
            # halfway across the widest gap between neurons near the s-quantile: the kernels' rounding
            # (fp32 x * g against the reference's bf16 RMSNorm) must not move a neuron across it
            k0, near = int(s * len(v)), max(1, len(v) // 100)
            k = max(range(k0 - near, k0 + near + 1), key=lambda k: (v[k] - v[k - 1]).item())
            ts[s].append(((v[k - 1] + v[k]) / 2).reshape(()).to(DEV))
    return copies, x, norm, ts


def call(case, cfg, s, i):
    """The MLP on copy i; the norm folded in where the model folds it (the FMA launches for one
    token); the tl.dot launches take x normalized (the model runs a norm kernel first)."""
    copies, x, norm, ts = case
    ws, scales = copies[i]
    if not cfg.fma_at_b1:
        return cm.cats_mlp_triton(cm.rms_norm_reference(x, *norm), *ws, ts[s][i], blocks=cfg, scales=scales)
    return cm.cats_mlp_triton(x, *ws, ts[s][i], blocks=cfg, scales=scales, norm=norm)


def checked(case, cfg):
    copies, x, norm, ts = case  # the tl.dot path's norm (above) is inside its time: a few µs
    for s in SPARSITIES:
        ref = cats_mlp_reference(x, *copies[0][0], ts[s][0], copies[0][1], norm).float()
        err = ((call(case, cfg, s, 0).float() - ref).norm() / ref.norm()).item()
        if not err < 5e-2:  # a neuron or two may cross the threshold (rounding): ~1.3% each
            raise AssertionError(f"rel_err {err:.2e}")


def stress(case, cfg, calls=300):
    """Many calls in a row, alternating copies and sparsities, each against the first result of its
    (copy, s): the row list's counter must be left at zero for the next call."""
    torch.manual_seed(0)
    first, worst = {}, 0.0
    for _ in range(calls):
        i, s = int(torch.randint(COPIES, ())), SPARSITIES[int(torch.randint(len(SPARSITIES), ()))]
        y = call(case, cfg, s, i).float()
        ref = first.setdefault((i, s), y)
        worst = max(worst, ((y - ref).norm() / ref.norm()).item())
    if DEV == "cuda":
        torch.cuda.synchronize()
    counter = cm.list_counter(DEV).tolist()
    print(f"stress {calls} calls: worst rel diff {worst:.2e}, counter {counter}", flush=True)
    if not (worst < 1e-3 and counter[0] == 0):
        raise AssertionError("calls disagree or the counter was left set")


def score(case, cfg):
    checked(case, cfg)
    return {s: graph_time_us(lambda: [call(case, cfg, s, i) for i in range(COPIES)], calls=10) / COPIES
            for s in SPARSITIES}


def launch_times(case, cfg):
    """{(s, kernel name): µs per call} from the profiler over eager calls."""
    for s in SPARSITIES:  # compile, warm
        call(case, cfg, s, 0)
    torch.cuda.synchronize()
    out = defaultdict(float)
    for s in SPARSITIES:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                for i in range(COPIES):
                    call(case, cfg, s, i)
            torch.cuda.synchronize()
        for e in prof.key_averages():
            if "kernel" in e.key:
                out[(s, e.key)] = e.device_time_total / (10 * COPIES)
    return out


def gemv_time(case):
    """The dense GEMV of W_gate alone (the model's tiles for the shape), for the gate launch's rate."""
    gm = importlib.import_module("catsgen.kernels.gemv")
    copies, x = case[0], case[1]
    us = graph_time_us(lambda: [gm.gemv_triton(x, ws[0], sc[0] if sc else None) for ws, sc in copies],
                       calls=10) / COPIES
    print(f"GEMV of W_gate alone: {us:.1f} us", flush=True)


def report(tag, case, cfg):
    t = score(case, cfg)
    per = launch_times(case, cfg)
    launches = " ".join(f"s={s} " + ", ".join(f"{k.strip('_').removesuffix('_kernel')} {us:.1f}"
                                             for (s2, k), us in sorted(per.items()) if s2 == s) for s in SPARSITIES)
    print(f"{tag}: s=0.5 {t[0.5]:.1f} us, s=0.7 {t[0.7]:.1f} us | launches: {launches} | {cfg}", flush=True)
    return t


def sweep(case, base):
    best, best_us = base, sum(score(case, base).values())
    print(f"sweep base {best_us:.1f}: {base}", flush=True)
    for name, changes in (("down", DOWN), ("up", UP), ("gate", GATE), ("stages", SHARED), ("sub", SUBS),
                          ("down", DOWN[:8])):
        for change in changes:
            cfg = dataclasses.replace(best, **change)
            if cfg == best:
                continue
            try:
                us = sum(score(case, cfg).values())
            except Exception as e:  # a tiling the compiler refuses (or a wrong one) is skipped
                print(f"  {name} {change}: {type(e).__name__} {str(e)[:80]}", flush=True)
                continue
            print(f"  {name} {change}: {us:.1f}", flush=True)
            if us < best_us:
                best, best_us = cfg, us
    print(f"sweep BEST {best_us:.1f}: {best}", flush=True)
    return best


def tile_changes(text):
    """--try's FIELD=INT[,FIELD=INT...] as {field: int} ("model": none), or an argparse error naming
    the fields."""
    if text == "model":
        return {}
    fields = {f.name for f in dataclasses.fields(mlp_tiles.Blocks)}
    pairs = [kv.partition("=") for kv in text.split(",")]
    if not all(k in fields and v.isdigit() for k, _, v in pairs):
        raise argparse.ArgumentTypeError(f"want FIELD=INT[,FIELD=INT...], FIELD one of {', '.join(sorted(fields))}")
    return {k: int(v) for k, _, v in pairs}


def tile_variants(model, changes: list) -> dict:
    """{label: the model's tiles with tile_changes' changes}, labelled as --try spells them ("model"
    for none)."""
    return {",".join(f"{k}={v}" for k, v in c.items()) or "model": dataclasses.replace(model, **c) for c in changes}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", nargs="+", default=["bf16", "int8"], choices=["bf16", "int8"])
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--ncu", action="store_true", help="only run each candidate twice, for ncu")
    p.add_argument("--stress", action="store_true", help="first: many calls in a row against their first results")
    p.add_argument("--gate", action="store_true", help="also gate tiles as narrow as the GEMV's (per-launch times)")
    p.add_argument("--down-warps", action="store_true", help="also the down launch with 4 or 1 warps")
    p.add_argument("--try", dest="tries", nargs="+", default=[], type=tile_changes, metavar="FIELD=INT[,...]",
                   help="variants of the model's tiles, e.g. down_warps=1 warps=1,up_r=16")
    a = p.parse_args()
    prepare_workspaces("cuda", 1, 1)
    print(torch.cuda.get_device_name(), torch.__version__)
    for weights in a.weights:
        case = make_case(weights)
        model = mlp_tiles.pick_blocks(1, int8=weights == "int8")
        bases = {"model": model}
        if a.down_warps:
            bases |= {f"down {w} warps {t}": dataclasses.replace(model, down_warps=w, **dict(zip(
                ("down_r", "down_d", "down_steps", "down_fold"), t))) for w, ts in DOWN_WARPS.items() for t in ts}
        bases |= tile_variants(model, a.tries)
        if a.stress:
            stress(case, model)
        if a.gate:  # (rows, columns, warps, stages): the dense GEMV's own tiles among them
            gemv_time(case)
            bases |= {f"gate {f}x{d} w{w} s{st}": dataclasses.replace(model, gate_f=f, gate_d=d, gate_warps=w,
                                                                     gate_stages=st)
                      for f, d, w, st in GATE_NARROW[weights]}
        for tag, cfg in bases.items():
            if a.ncu:
                for s in SPARSITIES[:1]:
                    call(case, cfg, s, 0), call(case, cfg, s, 1)
                torch.cuda.synchronize()
                continue
            try:  # one variant the compiler refuses, or a wrong one, does not end the others' run
                report(f"{weights} {tag}", case, cfg)
            except Exception as e:
                print(f"{weights} {tag}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            if a.sweep and tag == "model":
                report(f"{weights} {tag} swept", case, sweep(case, cfg))
        del case
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
