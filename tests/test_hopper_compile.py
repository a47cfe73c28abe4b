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


def test_register_caps_reach_the_compiler():
    """Blocks.gate_regs / up_regs / down_regs become Triton's maxnreg: the model's one-token int8
    launches take more than 64 (gate, up) and 96 (down) registers a thread, and no more with the caps."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).parent.parent / "scripts" / "sass_report.py"
    result = subprocess.run([sys.executable, script, "int8"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    registers = dict(re.findall(r"^cats_mlp (\w+ .*?): (\d+) registers", result.stdout, re.M))
    for launch, cap in (("_gate_kernel int8 B=1 FMA=True NORM=True WORDS=0", 64),
                        ("_up_kernel int8 B=1 FMA=True NORM=True WORDS=0", 64), ("down1_kernel int8 NORM=True", 96)):
        assert int(registers[launch]) > cap >= int(registers[f"{launch} maxnreg={cap}"]), result.stdout


def test_sass_report_compiles_tile_variants_at_the_model_shape():
    """scripts/sass_report.py --try: the model's one-token int8 launches, and a variant's with its
    changes in force (the gate's warps, the cap on its registers)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).parent.parent / "scripts" / "sass_report.py"
    result = subprocess.run([sys.executable, script, "--try", "model", "gate_f=4,gate_d=2048,gate_regs=64"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    model, variant = result.stdout.split("== ")[1:]
    assert [line.split(":")[0] for line in re.findall(r"^cats_mlp \w+", variant, re.M)] == \
        ["cats_mlp _gate_kernel", "cats_mlp _up_kernel", "cats_mlp down1_kernel"]
    gate = re.search(r"_gate_kernel: (\d+) registers.*grid (\d+)", variant)
    assert int(gate.group(1)) <= 64 and int(gate.group(2)) == 11008 // 4, variant
    assert re.search(r"_gate_kernel: .* grid 688:", model), model  # 16 rows a program
