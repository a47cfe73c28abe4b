"""int8 weight-only kernels: the Triton paths (run on CPU by Triton's interpreter) against their
torch references, and the references against the dequantized float weights."""
import dataclasses
import importlib
import os

import pytest
import torch

from catsgen.kernels import cats_mlp, cats_mlp_reference, int8_gemv, int8_gemv_reference, mlp_tiles
from catsgen.quantize import dequantize_int8, quantize_int8
from helpers_kernels import INT8_F32_TOL, SMALL, SMALL_FMA, poisoned_scratch, rel_err  # noqa: F401 (poisoned_scratch: a fixture)
from helpers_kernels import threshold as float_threshold

assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"  # conftest.py
# White-box: the kernels' modules (to_f32, Triton paths, scratch allocator), not the ops of the same names.
cm = importlib.import_module("catsgen.kernels.cats_mlp")
gm = importlib.import_module("catsgen.kernels.gemv")
to_f32 = importlib.import_module("catsgen.kernels.to_f32")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
CATS_TOL = TOL | {torch.float32: INT8_F32_TOL}  # the CATS launches' int8 -> fp32 has an offset
SMALL_GEMV = gm.GemvBlocks(block_n=16, block_k=16, split_k=3)  # several steps and splits, ragged tails


def _quantized(n, k, seed, zero_rows=()):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.linspace(0.2, 2, n)[:, None] / k**0.5
    w[list(zero_rows)] = 0
    q, scale = quantize_int8(w)
    return q.to(DEV), scale.to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("n,k,blocks", [(37, 67, gm.GemvBlocks()), (50, 45, SMALL_GEMV),
                                        (37, 67, gm.GemvBlocks(block_k=32, split_k=2, fma_at_b1=True)),
                                        (37, 64, gm.GemvBlocks(block_n=4, block_k=32, fma_at_b1=True)),  # no column mask
                                        (37, 67, gm.GemvBlocks(block_k=32, fma_at_b1=True, magic=False)),
                                        (37, 67, gm.GemvBlocks(block_n=4, block_k=32, fma_at_b1=True, sub=16)),  # runs summed
                                        (37, 64, gm.GemvBlocks(block_n=2, block_k=64, fma_at_b1=True, sub=8))])
def test_int8_gemv_matches_reference(dtype, B, n, k, blocks):
    q, scale = _quantized(n, k, seed=B, zero_rows=(3,))
    x = torch.randn(B, k, generator=torch.Generator().manual_seed(n)).to(DEV, dtype)
    out = gm.int8_gemv_triton(x, q, scale, blocks)
    ref = int8_gemv_reference(x, q, scale)
    assert out.shape == (B, n) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    assert (out[:, 3] == 0).all()  # a zero row (scale 0) gives exact zeros


@pytest.mark.parametrize("magic", [True, False])
def test_int8_to_float_conversion_is_exact_for_every_value(magic):
    """One token picking one column (x one-hot, scales 1): the FMA path's output is that column
    of q, converted, so every int8 value -128..127 must come back exactly."""
    q = torch.zeros(256, 32, dtype=torch.int8)
    q[:, 5] = torch.arange(-128, 128, dtype=torch.int8)
    x = torch.zeros(1, 32)
    x[0, 5] = 1.0
    out = gm.int8_gemv_triton(x.to(DEV), q.to(DEV), torch.ones(256, device=DEV),
                              gm.GemvBlocks(block_n=16, block_k=32, fma_at_b1=True, magic=magic))
    assert torch.equal(out[0].cpu(), torch.arange(-128, 128, dtype=torch.float32))


def _prmt(a, b, selector):
    """PTX prmt.b32 (default mode) on int64 tensors holding 32-bit values: byte i of the result is
    byte (selector's nibble i & 7) of the 8 bytes {b, a} (a's bytes 0-3, b's 4-7)."""
    out = torch.zeros_like(a)
    for i in range(4):
        k = (selector >> (4 * i)) & 7
        byte = (a >> (8 * k)) & 0xFF if k < 4 else (b >> (8 * (k - 4))) & 0xFF
        out |= byte << (8 * i)
    return out


@pytest.mark.parametrize("permutes,offset", [("PERMUTES_2_23", 8388736.0), ("PERMUTES_2_15", 32896.0)])
def test_int8_to_float_gpu_identity_for_every_value(permutes, offset):
    """The GPU paths of int8_to_f32 and int8_to_f32_offset (kernels/to_f32.py, inline PTX the
    interpreter can not run), emulated from the constants to_f32 builds that PTX from: the XOR with
    0x80808080, then for weight k the byte permute with its selector, read as fp32, is offset + b
    exactly (int8_to_f32 then subtracts 2^23 + 128; the offset variant leaves OFFSET), for every
    int8 b and every byte position."""
    constant, selectors = getattr(to_f32, permutes)
    b = torch.arange(-128, 128, dtype=torch.int64)
    for k, selector in enumerate(selectors):
        t = ((b & 0xFF) << (8 * k)) ^ 0x80808080  # b as byte k of a 32-bit register, sign bit flipped
        bits = _prmt(t, torch.full_like(t, int(constant, 16)), int(selector, 16)).to(torch.int32)
        assert torch.equal(bits.view(torch.float32).double() - offset, b.double())
    assert to_f32.OFFSET == 32896.0


def test_int8_gemv_reference_is_dequantized_linear():
    q, scale = _quantized(30, 20, seed=7)
    x = torch.randn(2, 20, dtype=torch.float64).to(DEV)
    expected = x @ dequantize_int8(q, scale, torch.float64).t()
    assert rel_err(int8_gemv_reference(x.float(), q, scale), expected) < 1e-6


def test_int8_gemv_takes_any_leading_dims():
    """[B, T, K] inputs (prefill: many tokens) go through the op; the result keeps the leading dims."""
    q, scale = _quantized(30, 20, seed=8)
    x = torch.randn(2, 19, 20).to(DEV)
    y = int8_gemv(x, q, scale)
    assert y.shape == (2, 19, 30)
    assert rel_err(y, int8_gemv_reference(x.reshape(38, 20), q, scale).reshape(2, 19, 30)) < 1e-5


def test_int8_gemv_custom_op_under_torch_compile():
    q, scale = _quantized(37, 67, seed=3)
    x = torch.randn(1, 67).to(DEV)
    step = lambda x: x[:, :37] + int8_gemv(x * 2, q, scale)  # noqa: E731
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # fake tensors check the registration
    assert rel_err(compiled(x), x[:, :37] + int8_gemv_reference(x * 2, q, scale)) < 1e-5
    torch.library.opcheck(torch.ops.catsgen.int8_gemv.default, (x, q, scale))


# ---- the CATS MLP on int8 weights (kernels/cats_mlp.py with scales) ----

def _int8_mlp(B, d, f, dtype, seed):
    """x in dtype and the int8 MLP: (q_gate, q_up, q_down_t), (s_gate, s_up, s_down)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g).to(DEV, dtype)
    w_gate, w_up, w_down = torch.randn(f, d, generator=g) / d**0.5, torch.randn(f, d, generator=g) / d**0.5, \
        torch.randn(d, f, generator=g) / f**0.5
    (qg, sg), (qu, su), (qd, sd) = quantize_int8(w_gate), quantize_int8(w_up), quantize_int8(w_down)
    return x, [qg.to(DEV), qu.to(DEV), qd.t().contiguous().to(DEV)], [sg.to(DEV), su.to(DEV), sd.to(DEV)]


def int8_threshold(x, qs, scales, sparsity):
    """A scalar threshold that zeroes a `sparsity` fraction of |SiLU(W_gate x)| (dequantized W_gate)."""
    return float_threshold(x, dequantize_int8(qs[0], scales[0]), sparsity)


@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("sparsity", [0, 0.4, 1])
@pytest.mark.parametrize("d,f,blocks,dtype", [(37, 67, None, torch.bfloat16),  # the int8 tiles
                                              (72, 150, SMALL, torch.float32),  # many steps, tails
                                              (72, 150, SMALL_FMA, torch.bfloat16),  # B = 1: FMA, tails
                                              (64, 160, SMALL_FMA, torch.float16),  # B = 1: FMA, no column mask
                                              (72, 150, dataclasses.replace(SMALL_FMA, sub=8), torch.bfloat16),  # runs summed
                                              (72, 150, dataclasses.replace(SMALL_FMA, down_fold=4), torch.bfloat16)])
def test_int8_cats_mlp_matches_reference(poisoned_scratch, dtype, B, sparsity, d, f, blocks):
    x, qs, scales = _int8_mlp(B, d, f, dtype, seed=B + f)
    t = int8_threshold(x, qs, scales, sparsity)
    out = cm.cats_mlp_triton(x, *qs, t, blocks=blocks, scales=scales)
    ref = cats_mlp_reference(x, *qs, t, scales=scales)
    assert out.shape == (B, d) and out.dtype == dtype and not out.isnan().any()
    if sparsity == 1:
        assert (out == 0).all()
    else:
        assert rel_err(out, ref) < CATS_TOL[dtype]


WORDS_TILES = dataclasses.replace(SMALL_FMA, sub=8, down_fold=4, down_words=True)  # down: 16 columns, whole words


@pytest.mark.parametrize("sparsity", [0, 0.4, 1])
@pytest.mark.parametrize("tiles", [dict(), dict(down_fold=0), dict(down_steps=1), dict(down_steps=3)])
def test_int8_cats_mlp_down_words_match_reference(poisoned_scratch, sparsity, tiles):
    """One token, the block's norm folded in, the down launch on int32 words a step ahead
    (Blocks.down_words, the model's int8 tiles): the reference's result, and the byte tiles' to
    fp32 rounding; with one step a program (nothing ahead inside it) and three (a last step past
    the list's end)."""
    d, f = 64, 150  # f: a last gate program with rows past the matrix
    x, qs, scales = _int8_mlp(1, d, f, torch.bfloat16, seed=len(str(tiles)))
    norm = (torch.rand(d, generator=torch.Generator().manual_seed(5)).to(DEV, torch.bfloat16) + 0.5, 1e-5)
    t = int8_threshold(cm.rms_norm_reference(x, *norm), qs, scales, sparsity)
    blocks = dataclasses.replace(WORDS_TILES, **tiles)
    assert mlp_tiles.down_words_fit(blocks, d)  # the words path is taken
    out = cm.cats_mlp_triton(x, *qs, t, blocks=blocks, scales=scales, norm=norm)
    ref = cats_mlp_reference(x, *qs, t, scales=scales, norm=norm)
    if sparsity == 1:
        assert (out == 0).all()
    else:
        assert rel_err(out, ref) < CATS_TOL[torch.bfloat16]
        as_bytes = dataclasses.replace(blocks, down_words=False)
        assert rel_err(cm.cats_mlp_triton(x, *qs, t, blocks=blocks, scales=scales, norm=norm, fp32_out=True),
                       cm.cats_mlp_triton(x, *qs, t, blocks=as_bytes, scales=scales, norm=norm, fp32_out=True)) \
            < INT8_F32_TOL


def test_int8_down_words_only_where_the_tiles_fit():
    assert mlp_tiles.down_words_fit(WORDS_TILES, 64)
    assert mlp_tiles.down_words_fit(WORDS_TILES, 48)  # down's 16 columns divide 48
    assert not mlp_tiles.down_words_fit(WORDS_TILES, 72)  # 72: not a multiple of 16
    assert not mlp_tiles.down_words_fit(dataclasses.replace(WORDS_TILES, down_d=32), 48)  # 32 columns do not divide 48
    assert not mlp_tiles.down_words_fit(dataclasses.replace(WORDS_TILES, down_words=False), 64)
    assert mlp_tiles.down_words_fit(mlp_tiles.INT8_B1_BLOCKS, 4096)  # the model's int8 tiles at Llama-2-7B's d


def test_int8_words_conversion_is_exact_for_every_value_and_position():
    """int8_words_to_f32_offset (the interpreter's path; the GPU's is the permutes checked above):
    byte k of a word comes back as OFFSET + b in output k, for every int8 b."""
    import triton
    import triton.language as tl

    @triton.jit
    def convert(words_ptr, out_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        b0, b1, b2, b3 = to_f32.int8_words_to_f32_offset(tl.load(words_ptr + i))
        tl.store(out_ptr + i, b0)
        tl.store(out_ptr + N + i, b1)
        tl.store(out_ptr + 2 * N + i, b2)
        tl.store(out_ptr + 3 * N + i, b3)

    b = torch.arange(-128, 128, dtype=torch.int8)
    byte_rows = torch.stack([b, b.roll(1), b.roll(2), b.roll(3)], dim=1)  # word j's bytes: 4 different values
    words = byte_rows.contiguous().view(torch.int32).flatten()
    out = torch.empty(4, 256, dtype=torch.float32)
    out = out.to(DEV)
    convert[(1,)](words.to(DEV), out, N=256)
    assert torch.equal(out.cpu() - to_f32.OFFSET.value, byte_rows.t().float())


def test_int8_cats_reference_is_dequantized_float_mlp():
    x, qs, scales = _int8_mlp(3, 24, 50, torch.float32, seed=2)
    t = int8_threshold(x, qs, scales, 0.5)
    dequantized = [dequantize_int8(q, s, transposed=i == 2) for i, (q, s) in enumerate(zip(qs, scales))]
    assert rel_err(cats_mlp_reference(x, *qs, t, scales=scales), cats_mlp_reference(x, *dequantized, t)) < 1e-6


@pytest.mark.parametrize("B", [1, 3])
def test_int8_skipped_neurons_read_no_byte(B):
    """Idle neurons (no token needs them): NaN scales of W_up and garbage rows of W_up / W_down^T
    must not reach y; so neither their rows nor their scales are read."""
    x, qs, scales = _int8_mlp(B, 40, 96, torch.float32, seed=B)
    t = int8_threshold(x, qs, scales, 0.6)
    ref = cats_mlp_reference(x, *qs, t, scales=scales)
    v = torch.nn.functional.silu(x @ dequantize_int8(qs[0], scales[0]).t())
    idle = ~(v.abs() > t).any(0)
    assert 0 < idle.sum() < 96
    qs[1][idle], qs[2][idle], scales[1][idle] = 127, -127, float("nan")
    for blocks in (None, SMALL):
        assert rel_err(cm.cats_mlp_triton(x, *qs, t, blocks=blocks, scales=scales), ref) < CATS_TOL[torch.float32]


@pytest.mark.parametrize("B", [1, 8])
def test_int8_per_neuron_threshold(B):
    x, qs, scales = _int8_mlp(B, 37, 67, torch.float16, seed=1)
    t = torch.rand(67, device=DEV) * 0.3
    out = cats_mlp(x, *qs, t, use_triton=True, scales=scales)
    assert out.dtype == torch.float16
    assert rel_err(out, cats_mlp_reference(x, *qs, t, scales=scales)) < TOL[torch.float16]


def test_int8_cats_custom_op_under_torch_compile():
    x, qs, scales = _int8_mlp(1, 37, 67, torch.float32, seed=3)
    t = int8_threshold(x, qs, scales, 0.5)
    step = lambda x, t: x + cats_mlp(x * 2, *qs, t, scales=scales)  # noqa: E731
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(x, t), x + cats_mlp_reference(x * 2, *qs, t, scales=scales)) < 1e-5
    torch.library.opcheck(torch.ops.catsgen.cats_mlp.default, (x, *qs, t, *scales))


def test_int8_dense_mlp_baseline_is_the_dequantized_mlp():
    """The benchmark's int8 dense MLP (three int8 GEMVs, W_down as [d, f]) and the int8 CATS MLP at
    t = -1 both compute the dense MLP on the dequantized weights."""
    from catsgen.kernels.bench import dense_mlp_wdown, int8_dense_mlp
    x, (qg, qu, qd_t), (sg, su, sd) = _int8_mlp(3, 24, 40, torch.float32, seed=4)
    qd = qd_t.t().contiguous()
    expected = dense_mlp_wdown(x, dequantize_int8(qg, sg), dequantize_int8(qu, su), dequantize_int8(qd, sd))
    assert rel_err(int8_dense_mlp(x, qg, qu, qd, sg, su, sd), expected) < 1e-5
    t = torch.tensor(-1.0, device=DEV)
    assert rel_err(cats_mlp(x, qg, qu, qd_t, t, scales=(sg, su, sd)), expected) < 1e-5
