"""Model-level A/B of the CATS MLP's one-token tiles, in one process: a preset model with random
weights is built and calibrated once; then, round after round, the model's tiles and each variant
in turn (kernels.mlp_tiles' B = 1 Blocks replaced, the decode step compiled and its CUDA graphs
recorded again) decode new_tokens at each sparsity, after one dense run a round. Ratios are read
within a round, so a machine's drift between calls does not enter them (notes/kernels.md v13).
    python3 scripts/gpu_tiles_ab.py [--preset llama-2-7b] [--quantize int8] --try FIELD=INT[,...] ...
                                    [--rounds 2] [--sparsity 0.5 0.7] [--new-tokens 256] [--repeats 2]"""
import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, as for bench.py
from catsgen import cats  # noqa: E402
from catsgen.bench import bench_one_sparsity, bench_thresholds, build_model  # noqa: E402
from catsgen.generate import make_decode_step  # noqa: E402
from catsgen.settings import BenchSettings  # noqa: E402
from catsgen.kernels import mlp_tiles  # noqa: E402
from gpu_sparse import tile_changes, tile_variants  # noqa: E402


def use_tiles(blocks: mlp_tiles.Blocks, int8: bool):
    """The one-token tiles pick_blocks returns from now on; compiled steps are dropped, so the next
    step records its launches with them."""
    setattr(mlp_tiles, "INT8_B1_BLOCKS" if int8 else "FLOAT_B1_BLOCKS", blocks)
    torch._dynamo.reset()


def decode_ms(model, prompt, settings, step, sparsity, table):
    cats.set_sparsity(model, table, sparsity, "uniform")  # s = 0: dense
    return bench_one_sparsity(model, prompt, settings, step, sparsity)["decode_ms_per_token_median"]


def run(settings: BenchSettings, preset: str, variants: dict, rounds: int, sparsities) -> dict:
    """{(label, sparsity): [ms a token, one a round]}, label "dense" for the dense rows."""
    torch.manual_seed(0)
    model = build_model(settings, None, preset)
    prompt = torch.randint(0, model.config.vocab_size, (settings.prompt_len,)).tolist()
    table = bench_thresholds(model, None, None, random_weights=True)
    int8 = settings.quantize == "int8"
    times = defaultdict(list)
    for r in range(rounds):
        for label, blocks in variants.items():
            use_tiles(blocks, int8)
            step = make_decode_step(settings.compile, settings.device)  # one a variant, as bench.py's
            if label == "model":  # dense runs no CATS launch: once a round
                times[("dense", 0.0)].append(decode_ms(model, prompt, settings, step, 0.0, table))
            for s in sparsities:
                ms = decode_ms(model, prompt, settings, step, s, table)
                times[(label, s)].append(ms)
                print(f"round {r} {label} s={s}: {ms:.3f} ms ({times[('dense', 0.0)][-1] / ms:.3f}x dense; "
                      f"the model's tiles' time / this {times[('model', s)][-1] / ms:.4f})", flush=True)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama-2-7b")
    p.add_argument("--quantize", default="int8", choices=["none", "int8"])
    p.add_argument("--try", dest="tries", nargs="+", required=True, type=tile_changes, metavar="FIELD=INT[,...]")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7])
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    settings = BenchSettings(device="cuda", dtype="bfloat16", quantize=a.quantize, compile=True,
                             new_tokens=a.new_tokens, repeats=a.repeats)
    variants = tile_variants(mlp_tiles.pick_blocks(1, int8=a.quantize == "int8"), [{}] + a.tries)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    times = run(settings, a.preset, variants, a.rounds, a.sparsity)
    dense = times[("dense", 0.0)]
    print("dense: " + ", ".join(f"{ms:.3f}" for ms in dense) + " ms")
    for (label, s), ms in times.items():
        if label != "dense":
            print(f"{label} s={s}: " + ", ".join(f"{t:.3f} ms ({d / t:.3f}x)" for t, d in zip(ms, dense)))


if __name__ == "__main__":
    main()
