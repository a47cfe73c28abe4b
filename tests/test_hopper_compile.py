"""Every Triton decode kernel, launched by its own host code, compiles for sm_90 (H100/H200):
the CPU tests run the kernels in Triton's interpreter, which accepts code the GPU compiler may
refuse. The compile runs in a subprocess without TRITON_INTERPRET (conftest sets it here)."""
import os
import re
import subprocess
import sys
from pathlib import Path


def test_every_decode_kernel_compiles_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("hopper_compile.py")
    result = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    # both decode attention modes; the three CATS launches at B = 1 and B > 1 for bf16 and int8, each
    # with and without the block's norm folded in, and at B = 1 the int8 launches with word tiles (one
    # step ahead or not, four words a lane or one, a tile of rows x words or words x rows) and with
    # registers capped; the GEMV: int8, bf16 +
    # residual, gated bf16 and int8
    assert "57 of 57 launches compiled for sm_90" in result.stdout, result.stdout


def test_sass_report_compiles_tile_variants_with_their_caps():
    """scripts/sass_report.py --try compiles the model's one-token int8 launches at Llama-2-7B's
    shape, and variants with their changes in force: Blocks.gate_regs / up_regs / down_regs reach
    the compiler as maxnreg (registers read back from the cubin: above the cap with the model's
    (the gate's 80, none for up and down), at most the cap with it), and a tile change sets the
    gate's grid."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).parent.parent / "scripts" / "sass_report.py"
    caps = {"_gate_kernel": 64, "_up_kernel": 64, "down1_words_kernel": 96}  # the model: 80 / none / none
    result = subprocess.run([sys.executable, script, "--try", "model", "gate_regs=64,up_regs=64,down_regs=96",
                             "gate_f=4,gate_d=2048"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    model, capped, narrow = [dict((name, (int(regs), int(grid))) for name, regs, grid in re.findall(
        r"^cats_mlp (\w+): (\d+) registers.* grid (\d+):", part, re.M)) for part in result.stdout.split("== ")[1:]]
    assert list(model) == list(capped) == list(narrow) == list(caps), result.stdout
    for launch, cap in caps.items():
        assert model[launch][0] > cap >= capped[launch][0], result.stdout
    assert model["_gate_kernel"][1] == 11008 // 16 and narrow["_gate_kernel"][1] == 11008 // 4, result.stdout
