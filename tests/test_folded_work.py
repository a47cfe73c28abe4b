"""Work folded into the decode kernels (issue 14): the GEMV (float or int8 weights) with a residual
on its output, or gated (the dense MLP's SiLU(x W_gate^T) * (x W_up^T)), and the CATS MLP with the
block's RMSNorm on its input, each against its torch reference under Triton's interpreter; the
references against plain torch."""
import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from catsgen.kernels import cats_mlp_reference
from catsgen.quantize import quantize_int8
from helpers_kernels import INT8_F32_TOL, SMALL, SMALL_FMA, poisoned_scratch, rel_err, threshold  # noqa: F401 (fixture)

assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"  # conftest.py
cm = importlib.import_module("catsgen.kernels.cats_mlp")
gm = importlib.import_module("catsgen.kernels.gemv")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
EPS = 1e-5


def _norm(k, seed):
    """A norm weight far from 1 (folding it in must matter) and its eps."""
    return (torch.rand(k, generator=torch.Generator().manual_seed(seed)) * 2 + 0.25).to(DEV), EPS


def _stream(B, k, seed, dtype):
    """A residual-stream vector: large and uneven, so 1 / rms is far from 1."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, k, generator=g) * torch.linspace(1, 30, k)).to(DEV, dtype)


def _weights(n, k, seed, dtype, int8):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k**0.5
    if int8:
        q, scale = quantize_int8(w)
        return q.to(DEV), scale.to(DEV)
    return w.to(DEV, dtype), None


GEMV_TILES = [gm.GemvBlocks(block_n=16, block_k=16), gm.GemvBlocks(block_n=4, block_k=32, fma_at_b1=True, magic=False),
              gm.GemvBlocks(block_n=4, block_k=32, fma_at_b1=True),  # odd k: tails; fma: B = 1 on the FMA units
              gm.GemvBlocks(block_n=2, block_k=32, fma_at_b1=True, sub=8)]  # the products summed in runs of 8 first


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("blocks", GEMV_TILES)
def test_gemv_matches_reference(dtype, B, int8, residual, blocks):
    n, k = 37, 67
    w, scale = _weights(n, k, seed=B, dtype=dtype, int8=int8)
    x = _stream(B, k, seed=n, dtype=dtype)
    res = _stream(B, n, seed=5, dtype=dtype) if residual else None
    out = gm.gemv_triton(x, w, scale, residual=res, blocks=blocks)
    ref = gm.gemv_reference(x, w, scale, residual=res)
    assert out.shape == (B, n) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("blocks", GEMV_TILES + [gm.GemvBlocks(block_n=16, block_k=16, split_k=3)])
def test_gated_gemv_matches_reference(dtype, B, int8, blocks):
    n, k = 37, 67
    (w, scale), up = _weights(n, k, seed=B, dtype=dtype, int8=int8), _weights(n, k, seed=B + 9, dtype=dtype, int8=int8)
    x = _stream(B, k, seed=n, dtype=dtype) / 10
    out = gm.gemv_triton(x, w, scale, up=up, blocks=blocks)  # a split-K tiling gets one split: SiLU needs the sum
    ref = gm.gemv_reference(x, w, scale, up=up)
    assert out.shape == (B, n) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


def test_gated_reference_is_silu_gate_times_up():
    wg, wu = (_weights(24, 40, seed=s, dtype=torch.float32, int8=False)[0] for s in (1, 2))
    x = _stream(3, 40, seed=3, dtype=torch.float32)
    expected = F.silu(F.linear(x, wg)) * F.linear(x, wu)
    assert rel_err(gm.gemv_reference(x, wg, up=(wu, None)), expected) < 1e-6


def test_gemv_residual_ignores_a_split_k_tiling():
    """The residual's add wants the whole sum in one program: a tiling asking for splits gets one."""
    w, _ = _weights(40, 96, seed=1, dtype=torch.float32, int8=False)
    x, res = _stream(1, 96, seed=2, dtype=torch.float32), _stream(1, 40, seed=4, dtype=torch.float32)
    out = gm.gemv_triton(x, w, residual=res, blocks=gm.GemvBlocks(block_n=16, block_k=16, split_k=3))
    assert rel_err(out, gm.gemv_reference(x, w, residual=res)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_reference_is_linear_then_add(dtype):
    w, _ = _weights(24, 40, seed=7, dtype=dtype, int8=False)
    x, res = _stream(3, 40, seed=8, dtype=dtype), _stream(3, 24, seed=9, dtype=dtype)
    expected = F.linear(x, w) + res
    got = gm.gemv_reference(x, w, residual=res)
    assert rel_err(got, expected) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_gemv_op_runs_compiled():
    w, _ = _weights(16, 32, seed=1, dtype=torch.float32, int8=False)
    x, res = _stream(1, 32, seed=2, dtype=torch.float32), _stream(1, 16, seed=3, dtype=torch.float32)
    step = torch.compile(lambda x, res: gm.gemv(x, w, residual=res) * 2, fullgraph=True, backend="aot_eager")
    assert rel_err(step(x, res), 2 * gm.gemv_reference(x, w, residual=res)) < 1e-6
    torch.library.opcheck(torch.ops.catsgen.gemv.default, (x, w, None, res, None, None))
    torch.library.opcheck(torch.ops.catsgen.gemv.default, (x, w, None, None, w * 0.5, None))


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("blocks", [SMALL, SMALL_FMA])
def test_cats_mlp_with_norm_matches_reference(poisoned_scratch, int8, B, sparsity, blocks):
    d, f = 45, 70
    x, norm = _stream(B, d, seed=B, dtype=torch.float32), _norm(d, B)
    ws = [_weights(f, d, seed=s, dtype=torch.float32, int8=int8) for s in (1, 2, 3)]
    w_gate, w_up, w_down = (w for w, _ in ws)
    if int8:  # W_down^T's scales are per column (W_down's output channels)
        q, s_down = quantize_int8(torch.randn(d, f, generator=torch.Generator().manual_seed(4)) / f**0.5)
        w_down, scales = q.t().contiguous().to(DEV), (ws[0][1], ws[1][1], s_down.to(DEV))
        gate_float = w_gate.float() * scales[0][:, None]
    else:
        scales, gate_float = None, w_gate
    t = threshold(cm.rms_norm_reference(x, *norm), gate_float, sparsity)
    out = cm.cats_mlp_triton(x, w_gate, w_up, w_down, t, blocks=blocks, scales=scales, norm=norm)
    ref = cats_mlp_reference(x, w_gate, w_up, w_down, t, scales=scales, norm=norm)
    if sparsity == 1.0:
        assert (out == 0).all()
    else:
        assert rel_err(out, ref) < (INT8_F32_TOL if int8 else 1e-5)


def test_cats_mlp_with_norm_per_neuron_thresholds():
    d, f = 45, 70
    x, norm = _stream(3, d, seed=1, dtype=torch.float32), _norm(d, 2)
    w_gate, w_up, w_down = (_weights(f, d, seed=s, dtype=torch.float32, int8=False)[0] for s in (5, 6, 7))
    t = torch.rand(f, generator=torch.Generator().manual_seed(3)).to(DEV) * 0.3
    out = cm.cats_mlp_triton(x, w_gate, w_up, w_down, t, blocks=SMALL, norm=norm)
    assert rel_err(out, cats_mlp_reference(x, w_gate, w_up, w_down, t, norm=norm)) < 1e-5


def test_cats_reference_with_norm_is_the_norm_then_the_mlp():
    d, f = 24, 40
    x, norm = _stream(2, d, seed=1, dtype=torch.float32), _norm(d, 2)
    w_gate, w_up, w_down = (_weights(f, d, seed=s, dtype=torch.float32, int8=False)[0] for s in (5, 6, 7))
    t = torch.tensor(0.05, device=DEV)
    normed = cm.rms_norm_reference(x, *norm)
    assert torch.equal(cats_mlp_reference(x, w_gate, w_up, w_down, t, norm=norm),
                       cats_mlp_reference(normed, w_gate, w_up, w_down, t))


def test_norm_reference_is_torchs_rms_norm():
    """The norm the CATS launches fold in (and the model's RMSNorm calls) against torch's own."""
    x, (weight, eps) = _stream(3, 40, seed=5, dtype=torch.float32), _norm(40, 6)
    assert rel_err(cm.rms_norm_reference(x, weight, eps), F.rms_norm(x, (40,), weight, eps)) < 1e-6
