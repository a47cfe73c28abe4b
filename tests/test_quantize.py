"""Weight-only int8 quantization (catsgen/quantize.py): error bounds, zero rows, dtypes, layouts."""
import pytest
import torch

from catsgen.quantize import Int8Weight, dequantize_int8, quantize_int8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_error_bounded_per_channel(dtype):
    g = torch.Generator().manual_seed(0)
    # channels of very different magnitudes: a per-tensor scale would fail the small ones
    w = (torch.randn(37, 53, generator=g) * torch.logspace(-3, 2, 37)[:, None]).to(dtype)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (37,)
    assert q.abs().max() <= 127
    err = (w.float() - dequantize_int8(q, scale)).abs()
    # 1e-4: fp32 rounding of q * scale (|q| <= 127) at an exact tie (bf16 inputs have them)
    assert (err <= scale[:, None] / 2 * (1 + 1e-4)).all()
    # every channel uses the full range: its largest entry maps to +-127
    assert torch.equal(q.abs().amax(dim=1), torch.full((37,), 127, dtype=torch.int8))


def test_zero_rows_and_signs():
    w = torch.tensor([[0.0, 0.0, 0.0], [1.0, -0.5, 0.25], [-2.0, 0.0, 2.0]])
    q, scale = quantize_int8(w)
    assert scale[0] == 0 and (q[0] == 0).all()
    assert torch.equal(q[1], torch.tensor([127, -64, 32], dtype=torch.int8))  # -63.5 and 31.75 round to nearest
    assert torch.equal(q[2], torch.tensor([-127, 0, 127], dtype=torch.int8))
    assert torch.equal(dequantize_int8(q, scale)[0], torch.zeros(3))
    assert not dequantize_int8(q, scale).isnan().any()


def test_rejects_what_is_not_a_float_matrix():
    with pytest.raises(ValueError, match="2-D float"):
        quantize_int8(torch.randn(4))
    with pytest.raises(ValueError, match="2-D float"):
        quantize_int8(torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="does not fit"):
        Int8Weight(torch.zeros(3, 4, dtype=torch.int8), torch.ones(4))


def test_transposed_weight_keeps_output_channel_scales():
    """W_down [d, f] stored as W_down^T [f, d] (row = neuron): q is the transpose of the
    per-output-channel q, its scale [d] is per column, and skipping a neuron (a row of q)
    leaves every scale in use."""
    g = torch.Generator().manual_seed(1)
    w_down = torch.randn(24, 40, generator=g) * torch.linspace(0.1, 3, 24)[:, None]
    wt = Int8Weight.from_float(w_down, transpose=True)
    q, scale = quantize_int8(w_down)
    assert wt.shape == (40, 24) and wt.transposed
    assert torch.equal(wt.q, q.t()) and torch.equal(wt.scale, scale)
    assert torch.equal(wt.dequantize(), dequantize_int8(q, scale).t())
    h = torch.randn(3, 40, generator=g)
    # y = h @ W_down^T with the scale applied once after the sum over neurons
    assert torch.allclose((h @ wt.q.float()) * wt.scale, h @ wt.dequantize(), rtol=1e-5, atol=1e-5)
    assert wt.nbytes() == 40 * 24 + 4 * 24


def test_module_moves_and_casts_like_a_weight():
    w = torch.randn(16, 8, dtype=torch.bfloat16)
    m = Int8Weight.from_float(w)
    assert m.dequantize(torch.bfloat16).dtype == torch.bfloat16
    m = m.to(torch.float16)  # a model cast to the compute dtype must leave int8 and fp32 scales alone
    assert m.q.dtype == torch.int8 and m.scale.dtype == torch.float32
    assert set(dict(m.named_buffers())) == {"q", "scale"} and not list(m.parameters())
    assert (m.dequantize() - w.float()).abs().max() <= m.scale.max() / 2 * (1 + 1e-4)


@pytest.mark.parametrize("transpose", [False, True])
def test_module_applies_the_linear_it_holds(transpose):
    """Int8Weight(x) = x @ W^T with W dequantized, whichever layout it stores, any leading dims."""
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(12, 20, generator=g), torch.randn(2, 3, 20, generator=g)
    m = Int8Weight.from_float(w, transpose=transpose)
    y = m(x.to(torch.bfloat16))
    assert y.shape == (2, 3, 12) and y.dtype == torch.bfloat16
    expected = x @ dequantize_int8(*quantize_int8(w)).t()
    assert torch.allclose(y.float(), expected, rtol=2e-2, atol=2e-2)
