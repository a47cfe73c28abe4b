"""The device scripts' CPU-checkable parts, so a device call is not spent finding a broken one:
their checks against torch at small shapes (Triton's interpreter), a tile variant's parsing, and
the model A/B's flow on a tiny model."""
import dataclasses
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_path = list(sys.path)
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_launch_floor  # noqa: E402
import gpu_sparse  # noqa: E402
import gpu_tiles_ab  # noqa: E402
import sass_report  # noqa: E402

# the scripts put the repository root first on sys.path, where kernels/ would shadow the package
# transformers imports (conftest.py): the path as it was, with scripts/ after it
sys.path[:] = _path + [str(ROOT / "scripts")]

from catsgen import config  # noqa: E402
from catsgen.kernels import prepare_workspaces  # noqa: E402
from catsgen.settings import BenchSettings  # noqa: E402


def test_int8_floor_kernels_match_torch():
    gpu_launch_floor.check_int8_rows("cpu")  # raises on a mode whose row sums are wrong


def test_bad_tile_variant_is_an_argparse_error():
    with pytest.raises(Exception, match="FIELD one of"):
        gpu_sparse.tile_changes("down_wordz=1")


def test_tiles_ab_runs_every_variant_each_round(monkeypatch):
    """The model A/B's flow on a tiny preset on the CPU: every (variant, sparsity) timed once a
    round, dense once a round, and the variant's tiles the ones in force while it runs."""
    tiny = dataclasses.replace(config.PRESETS["llama-2-7b"], dim=64, n_layers=2, n_heads=4, n_kv_heads=4,
                               intermediate_size=160, vocab_size=320)
    monkeypatch.setitem(config.PRESETS, "tiny", tiny)
    monkeypatch.setattr(gpu_tiles_ab.mlp_tiles, "INT8_B1_BLOCKS", gpu_tiles_ab.mlp_tiles.INT8_B1_BLOCKS)  # restored after
    seen = []
    real = gpu_tiles_ab.decode_ms
    monkeypatch.setattr(gpu_tiles_ab, "decode_ms", lambda *a: seen.append(gpu_tiles_ab.mlp_tiles.INT8_B1_BLOCKS) or real(*a))
    settings = BenchSettings(device="cpu", dtype="float32", quantize="int8", compile=False, new_tokens=3, repeats=1,
                             prompt_len=8, max_seq_len=64)
    model = gpu_tiles_ab.mlp_tiles.INT8_B1_BLOCKS
    variant = dataclasses.replace(model, down_words=False)
    times = gpu_tiles_ab.run(settings, "tiny", {"model": model, "words": variant}, rounds=2, sparsities=[0.5])
    assert {k: len(v) for k, v in times.items()} == {("dense", 0.0): 2, ("model", 0.5): 2, ("words", 0.5): 2}
    assert all(ms > 0 for v in times.values() for ms in v)
    assert seen == [model, model, variant] * 2  # a round: dense and s = 0.5 on the model's tiles, then the variant


def test_a_swapped_table_is_the_ops_tiles(monkeypatch):
    """gpu_tiles_ab.use_tiles swaps kernels/mlp_tiles' table; the op's next launch must take its
    tiles from it (cats_mlp_triton reads the table through mlp_tiles at every call)."""
    import torch
    from catsgen.quantize import quantize_int8
    mlp_tiles, cm = gpu_tiles_ab.mlp_tiles, gpu_sparse.cm
    monkeypatch.setattr(mlp_tiles, "INT8_B1_BLOCKS", mlp_tiles.INT8_B1_BLOCKS)  # restored after
    variant = dataclasses.replace(mlp_tiles.INT8_B1_BLOCKS, gate_f=8, gate_regs=80)
    gpu_tiles_ab.use_tiles(variant, int8=True)
    seen = []
    monkeypatch.setattr(cm, "down_words_fit", lambda cfg, D: seen.append(cfg) or False)  # bytes: d = 64 has no whole down tile
    torch.manual_seed(0)
    d, f = 64, 48
    (qg, sg), (qu, su), (qd, sd) = quantize_int8(torch.randn(f, d)), quantize_int8(torch.randn(f, d)), \
        quantize_int8(torch.randn(d, f))  # W_down [d, f]: its scale per output channel, [d]
    prepare_workspaces("cpu", 1, 1)
    cm.cats_mlp_triton(torch.randn(1, d), qg, qu, qd.t().contiguous(), torch.tensor(0.1), scales=(sg, su, sd))
    assert seen == [variant]


def test_programs_an_sm_by_registers_and_warps():
    assert sass_report.programs_per_sm(80, 4) == 6  # 80 x 32 = 2560 registers a warp: 65536 // 10240
    assert sass_report.programs_per_sm(96, 4) == 5  # the int8 gate a step ahead: 5 x 132 < 688 programs
    assert sass_report.programs_per_sm(75, 2) == 12  # 75 rounds up to 80 (units of 256 a warp)
    assert sass_report.programs_per_sm(128, 1) == 16
    assert sass_report.programs_per_sm(24, 1) == 32  # then 32 programs an SM is the limit
    assert sass_report.programs_per_sm(24, 8) == 8  # and 64 warps
