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
    # with and without the block's norm folded in, and at B = 1 the int8 launches with the down launch
    # on bytes and with the gate's registers capped lower; the GEMV: int8, bf16 + residual, gated bf16
    # and int8
    assert "42 of 42 launches compiled for sm_90" in result.stdout, result.stdout


def test_sass_report_compiles_tile_variants_with_their_caps():
    """scripts/sass_report.py --try compiles the model's one-token int8 launches at Llama-2-7B's
    shape, and variants with their changes in force: Blocks.gate_regs reaches the compiler as
    maxnreg (registers read back from the cubin: above 64 with the model's cap of 80, at most 64
    with 64), and a tile change sets the gate's grid."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).parent.parent / "scripts" / "sass_report.py"
    result = subprocess.run([sys.executable, script, "--try", "model", "gate_regs=64",
                             "gate_f=4,gate_d=2048"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    model, capped, narrow = [dict((name, (int(regs), int(grid))) for name, regs, grid in re.findall(
        r"^cats_mlp (\w+): (\d+) registers.* grid (\d+):", part, re.M)) for part in result.stdout.split("== ")[1:]]
    assert list(model) == list(capped) == list(narrow) == ["_gate_kernel", "_up_kernel", "down1_words_kernel"], \
        result.stdout
    assert model["_gate_kernel"][0] > 64 >= capped["_gate_kernel"][0], result.stdout
    assert model["_gate_kernel"][1] == 11008 // 16 and narrow["_gate_kernel"][1] == 11008 // 4, result.stdout
