"""GPU check of the flash-decoding attention kernel (kernels/decode_attention.py):
  1. kernel vs the torch reference at real shapes (bf16; fp16 / fp32 spot checks), then many
     calls at random positions (the last part of each head combines: a race would show here);
  2. a small model decoding with the kernel vs the same model with the old SDPA path
     (Attention.decode_kernel = False);
  3. time: decode_attention_rope (the decode step's attention launch) over the tilings in SWEEP;
     with --all also the kernel vs SDPA over the whole cache with a boolean mask. Each call captured in a CUDA graph, rotating over 8
     layers' caches so L2 holds none of them.
`--bench-baseline BENCH_ARGS...` instead runs bench.py with the decode step on the old SDPA
path (Attention.decode_kernel = False: the baseline, on the same card).
    python3 scripts/gpu_attention.py [--all]
"""
import importlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, as for bench.py
import catsgen.model as M  # noqa: E402
from catsgen.kernels import decode_attention, decode_attention_reference  # noqa: E402
from catsgen.kernels.bench import graph_time_us as kernel_graph_time_us  # noqa: E402

# The kernel's module, for its tilings and Triton path (the op of the same name is imported above).
da = importlib.import_module("catsgen.kernels.decode_attention")
Blocks, DEFAULT_BLOCKS, arrival_counters, decode_attention_triton = (
    da.Blocks, da.DEFAULT_BLOCKS, da.arrival_counters, da.decode_attention_triton)


def sdpa_whole_cache(q, k, v, pos, window):
    """What Attention.forward does for decode without the kernel: SDPA over all S positions."""
    mask = M.attention_mask(pos, torch.arange(k.shape[2], device=q.device), window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def graph_time_us(fns, replays=20):
    """Median time of one call: the calls in fns (one per layer, so the caches rotate and L2
    does not hold them) captured in one graph, replayed."""
    def all_layers():
        for fn in fns:
            fn()
    return kernel_graph_time_us(all_layers, calls=4, replays=replays) / len(fns)


def check_kernel():
    ok = True
    cases = [(32, 200, 0, torch.bfloat16), (32, 2000, 0, torch.bfloat16), (8, 200, 0, torch.bfloat16),
             (8, 2000, 0, torch.bfloat16), (8, 2000, 512, torch.bfloat16), (32, 0, 0, torch.bfloat16),
             (8, 2047, 0, torch.bfloat16), (8, 1000, 0, torch.float16), (32, 1000, 0, torch.float32),
             (8, 1000, 100, torch.float32)]
    for Hkv, p, window, dt in cases:
        q = torch.randn(1, 32, 1, 128, device="cuda", dtype=dt)
        k, v = (torch.randn(1, Hkv, 2048, 128, device="cuda", dtype=dt) for _ in range(2))
        pos = torch.tensor([p], device="cuda")
        out = decode_attention(q, k, v, pos, window)
        err = rel_err(out, decode_attention_reference(q, k, v, pos, window))
        good = not out.isnan().any() and err < (1e-4 if dt == torch.float32 else 1e-2)
        ok &= good
        print(f"check Hkv={Hkv} pos={p} window={window} {dt}: rel_err={err:.2e} {'OK' if good else 'FAIL'}")
    return ok & check_repeated_calls() & check_fused()


def check_fused(calls=100):
    """decode_attention_rope (RoPE + cache write + attention in one launch) against its reference,
    output and cache, at random positions, with and without a sliding window."""
    worst = 0.0
    for Hkv, window in ((32, 0), (8, 0), (8, 512)):
        qkv = torch.randn(1, 1, (32 + 2 * Hkv) * 128, device="cuda", dtype=torch.bfloat16)
        cos, sin = torch.randn(2048, 128, device="cuda"), torch.randn(2048, 128, device="cuda")  # tables
        kv = torch.randn(2, 1, Hkv, 2048, 128, device="cuda", dtype=torch.bfloat16)
        for i in range(calls):
            pos = torch.randint(0, 2048, (1,), device="cuda")
            kv_ref = kv.clone()
            blk = SWEEP[i % len(SWEEP)]  # every tiling of the sweep, checked natively
            try:
                out = da.decode_attention_rope_triton(qkv, cos, sin, kv, pos, 32, window, blocks=blk)
            except OutOfResources:
                continue  # this tiling does not fit (its timing says so too)
            ref = da.decode_attention_rope_reference(qkv, cos, sin, kv_ref, pos, 32, window)
            cache_err = (kv.float() - kv_ref.float()).abs().max().item() / kv_ref.float().abs().max().item()
            worst = max(worst, rel_err(out, ref), cache_err)
    good = worst < 1e-2
    print(f"check fused rope+cache+attention, {3 * calls} calls: worst rel_err={worst:.2e} {'OK' if good else 'FAIL'}")
    return good


def check_repeated_calls(calls=150):
    """Many calls at random positions, each against the reference; the arrival counters must
    be back at zero after them."""
    worst = 0.0
    for Hkv, S in ((32, 2048), (8, 2048), (8, 4096)):
        q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, Hkv, S, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        for _ in range(calls):
            pos = torch.randint(0, S, (1,), device="cuda")
            worst = max(worst, rel_err(decode_attention_triton(q, k, v, pos), decode_attention_reference(q, k, v, pos)))
        worst = max(worst, float("inf") if arrival_counters("cuda", Hkv)[:Hkv].any() else 0.0)
    print(f"check {3 * calls} calls at random positions: worst rel_err={worst:.2e} {'OK' if worst < 1e-2 else 'FAIL'}")
    return worst < 1e-2


@torch.no_grad()
def check_model():
    """Logits of a small model (head_dim 128, GQA, with and without a sliding window) decoding
    with the kernel, eager and compiled (aot_eager), against the old SDPA path."""
    from catsgen.checkpoint import random_model
    from catsgen.config import ModelConfig
    ok = True
    for window, dtype in [(None, torch.float32), (24, torch.float32), (24, torch.bfloat16)]:
        cfg = ModelConfig(dim=512, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=512, vocab_size=256,
                          sliding_window=window)
        model = random_model(cfg, "cuda", dtype)
        model.setup_caches(1, 100)
        prompt = torch.randint(0, 256, (1, 20), device="cuda")
        tokens = torch.randint(0, 256, (1, 40), device="cuda")

        def run(use_kernel, compiled=False):
            for layer in model.layers:
                layer.attention.decode_kernel = use_kernel
            torch._dynamo.reset()
            fwd = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
            model(prompt, torch.arange(20, device="cuda"))
            logits = []
            for i in range(20, 60):  # fixed tokens, not argmax: near-ties must not fork the sequence
                logits.append(fwd(tokens[:, i - 20:i - 19], torch.tensor([i], device="cuda")).float())
            return torch.cat(logits)

        base = run(use_kernel=False)
        for name, compiled in [("eager", False), ("compiled", True)]:
            err = rel_err(run(True, compiled), base)
            good = err < (1e-4 if dtype == torch.float32 else 2e-2)
            ok &= good
            print(f"model window={window} {dtype} {name}: logits rel_err={err:.2e} {'OK' if good else 'FAIL'}")
    return ok


SWEEP = [Blocks(), Blocks(dot_one_head=False), Blocks(min_part=32, block_n=32),
         Blocks(programs=512, min_part=32, block_n=32), Blocks(programs=512), Blocks(programs=128),
         Blocks(warps=2), Blocks(warps=8), Blocks(stages=1), Blocks(stages=3),
         Blocks(min_part=128, block_n=128, warps=8), Blocks(min_part=128), Blocks(block_c=16)]


def blocks_name(b):
    return f"p{b.programs}/m{b.min_part}/n{b.block_n}/w{b.warps}/s{b.stages}{'/dot' if b.dot_one_head else ''}"


def fused_timings():
    """decode_attention_rope (the model's decode attention: RoPE, cache write, attention in one
    launch) per layer over the tilings in SWEEP, at the bench's positions (prompt 128 + 256 new
    tokens) and longer; the score is the mean over Hkv 32 and 8 at positions 128-384."""
    positions = (128, 256, 384, 1000, 3000)
    print(f"\n{torch.cuda.get_device_name()}, bf16, B=1, 32 heads, D=128, S=4096: decode_attention_rope "
          "(us per layer, CUDA graphs over 8 layers' caches)")
    print(f"{'tiling':>32} " + " ".join(f"{h}/{p:>4}" for h in (32, 8) for p in positions) + "   score")
    inputs = {}
    for Hkv in (32, 8):
        layers = [torch.randn(2, 1, Hkv, 4096, 128, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
        qkv = torch.randn(1, 1, (32 + 2 * Hkv) * 128, device="cuda", dtype=torch.bfloat16)
        inputs[Hkv] = layers, qkv
    cos, sin = torch.randn(4096, 128, device="cuda"), torch.randn(4096, 128, device="cuda")  # tables
    scores = {}
    for blk in SWEEP:
        times = []
        for Hkv in (32, 8):
            layers, qkv = inputs[Hkv]
            for p in positions:
                pos = torch.tensor([p], device="cuda")
                try:
                    times.append(graph_time_us([lambda kv=kv: da.decode_attention_rope_triton(
                        qkv, cos, sin, kv, pos, 32, None, blocks=blk) for kv in layers]))
                except OutOfResources:
                    times.append(float("inf"))
        score = sum(times[i] for i in (0, 1, 2, 5, 6, 7)) / 6
        scores[blocks_name(blk)] = score
        print(f"{blocks_name(blk):>32} " + " ".join(f"{t:8.2f}" for t in times) + f" {score:7.2f}", flush=True)
    print("best:", min(scores, key=scores.get))


def timings():
    rows = []
    variants = [DEFAULT_BLOCKS, Blocks(min_part=16), Blocks(programs=128), Blocks(programs=512),
                Blocks(block_n=32, stages=3)]
    for Hkv in (32, 8):
        layers = [[torch.randn(1, Hkv, 2048, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
                  for _ in range(8)]
        q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        for p in (200, 1000, 2000):
            pos = torch.tensor([p], device="cuda")
            sdpa = graph_time_us([lambda k=k, v=v: sdpa_whole_cache(q, k, v, pos, None) for k, v in layers])
            row = dict(Hkv=Hkv, pos=p, sdpa=sdpa)
            for i, blk in enumerate(variants):
                row[i] = graph_time_us([lambda k=k, v=v: decode_attention_triton(q, k, v, pos, None, blocks=blk)
                                        for k, v in layers])
            row["op"] = graph_time_us([lambda k=k, v=v: decode_attention(q, k, v, pos) for k, v in layers])
            row["gbps"] = 2 * Hkv * (p + 1) * 128 * 2 / (row["op"] * 1e-6) / 1e9
            rows.append(row)
            print(row)
    print(f"\n{torch.cuda.get_device_name()}, bf16, B=1, 32 heads, D=128, S=2048, per call (us), CUDA graphs, median")
    names = [f"p{b.programs}/m{b.min_part}/n{b.block_n}/s{b.stages}" for b in variants]
    print(f"{'Hkv':>4} {'pos':>5} {'sdpa':>8} " + " ".join(f"{n:>13}" for n in names) + f" {'op':>7} {'op GB/s':>8} {'speedup':>8}")
    for r in rows:
        print(f"{r['Hkv']:>4} {r['pos']:>5} {r['sdpa']:8.1f} " + " ".join(f"{r[i]:13.1f}" for i in range(len(variants)))
              + f" {r['op']:7.1f} {r['gbps']:8.0f} {r['sdpa'] / r['op']:7.1f}x")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bench-baseline"]:
        from catsgen.cli import main
        M.Attention.decode_kernel = False
        print("BASELINE: decode attention = SDPA over the whole cache (the path before the kernel)", flush=True)
        main(argv=sys.argv[2:], prog_name="bench.py", command="bench")
    print("torch", torch.__version__, "triton", __import__("triton").__version__, torch.cuda.get_device_name())
    ok = check_kernel()
    ok &= check_model()
    fused_timings()
    if "--all" in sys.argv:
        timings()
    sys.exit(0 if ok else 1)
