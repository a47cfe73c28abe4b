"""int8 weight-only kernels: the Triton paths (run on CPU by Triton's interpreter) against their
torch references, and the references against the dequantized float weights."""
import os

import pytest
import torch

from catsgen.kernels.int8_gemv import GemvBlocks, int8_gemv, int8_gemv_reference, int8_gemv_triton
from catsgen.quantize import dequantize_int8, quantize_int8

assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"  # conftest.py

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
SMALL_GEMV = GemvBlocks(block_n=16, block_k=16, split_k=3)  # several steps and splits, ragged tails


def _rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _quantized(n, k, seed, zero_rows=()):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.linspace(0.2, 2, n)[:, None] / k**0.5
    w[list(zero_rows)] = 0
    q, scale = quantize_int8(w)
    return q.to(DEV), scale.to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("n,k,blocks", [(37, 67, GemvBlocks()), (50, 45, SMALL_GEMV)])
def test_int8_gemv_matches_reference(dtype, B, n, k, blocks):
    q, scale = _quantized(n, k, seed=B, zero_rows=(3,))
    x = torch.randn(B, k, generator=torch.Generator().manual_seed(n)).to(DEV, dtype)
    out = int8_gemv_triton(x, q, scale, blocks)
    ref = int8_gemv_reference(x, q, scale)
    assert out.shape == (B, n) and out.dtype == dtype
    assert _rel_err(out, ref) < TOL[dtype]
    assert (out[:, 3] == 0).all()  # a zero row (scale 0) gives exact zeros


def test_int8_gemv_reference_is_dequantized_linear():
    q, scale = _quantized(30, 20, seed=7)
    x = torch.randn(2, 20, dtype=torch.float64).to(DEV)
    expected = x @ dequantize_int8(q, scale, torch.float64).t()
    assert _rel_err(int8_gemv_reference(x.float(), q, scale), expected) < 1e-6


def test_int8_gemv_custom_op_under_torch_compile():
    q, scale = _quantized(37, 67, seed=3)
    x = torch.randn(1, 67).to(DEV)
    step = lambda x: x[:, :37] + int8_gemv(x * 2, q, scale)  # noqa: E731
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # fake tensors check the registration
    assert _rel_err(compiled(x), x[:, :37] + int8_gemv_reference(x * 2, q, scale)) < 1e-5
    torch.library.opcheck(torch.ops.catsgen.int8_gemv.default, (x, q, scale))
