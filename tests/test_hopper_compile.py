"""Every Triton decode kernel, launched by its own host code, compiles for sm_90 (H100/H200):
the CPU tests run the kernels in Triton's interpreter, which accepts code the GPU compiler may
refuse. The compile runs in a subprocess without TRITON_INTERPRET (conftest sets it here)."""
import os
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
    # step ahead or not, four words a lane or one); the GEMV: int8, bf16 + residual, gated bf16 and int8
    assert "48 of 48 launches compiled for sm_90" in result.stdout, result.stdout
