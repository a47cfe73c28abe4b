"""Flash-decoding attention: the Triton path (run on CPU by Triton's interpreter) against the
torch reference, the reference against an independently written softmax, and the custom op
inside a fullgraph-compiled step."""
import importlib
import math
import os

import pytest
import torch

# White-box: the kernel's module (tiles, Triton path, workspace), not the op of the same name.
da = importlib.import_module("catsgen.kernels.decode_attention")

# conftest.py chooses Triton's interpreter on machines without CUDA, before triton is imported.
assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
SMALL = da.Blocks(programs=20, granule=8, min_part=16, block_n=16, block_c=2)  # several parts, loop steps and reduction steps


def _inputs(B, H, Hkv, S, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, 1, D, generator=g)
    k = torch.randn(B, Hkv, S, D, generator=g)
    v = torch.randn(B, Hkv, S, D, generator=g)
    return [t.to(DEV, dtype) for t in (q, k, v)]


def _rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def _naive(q, k, v, pos, window):
    """Per head, per allowed key: an explicit softmax in float64, with no SDPA and no repeats."""
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    lo = max(0, pos - window + 1) if window else 0
    out = torch.empty(B, H, 1, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kh, vh = k[b, h // (H // Hkv), lo:pos + 1].double(), v[b, h // (H // Hkv), lo:pos + 1].double()
            w = torch.softmax(kh @ q[b, h, 0].double() / math.sqrt(D), dim=0)
            out[b, h, 0] = w @ vh
    return out


@pytest.mark.parametrize("B,H,Hkv,S,D", [(1, 4, 4, 83, 16), (2, 6, 2, 83, 32), (1, 8, 1, 70, 16)])
@pytest.mark.parametrize("window", [0, 5, 40])
def test_triton_matches_reference(B, H, Hkv, S, D, window):
    q, k, v = _inputs(B, H, Hkv, S, D, torch.float32, seed=S + D + window)
    for p in (0, 1, 31, 32, 33, 47, S - 1):  # first position, part edges, middle, last
        pos = torch.tensor([p], device=DEV)
        out = da.decode_attention_triton(q, k, v, pos, window, blocks=SMALL)
        ref = da.decode_attention_reference(q, k, v, pos, window)
        assert out.shape == (B, H, 1, D) and out.dtype == q.dtype
        assert _rel_err(out, ref) < 1e-5, (p, _rel_err(out, ref))
        assert (da.arrival_counters(DEV, B * Hkv)[:B * Hkv] == 0).all()  # left at zero for the next call


@pytest.mark.parametrize("blocks", [da.Blocks(programs=20, granule=8, min_part=4096, block_n=16),
                                    da.Blocks(programs=20, granule=8, min_part=16, block_n=16, dot_one_head=True)],
                         ids=["one-part", "dot-one-head"])
def test_single_part_and_padded_dot_paths(blocks):
    """A range held by one program (it writes the output, no combine) and tensor-core dots with
    one query head per kv head, for plain and fused RoPE launches."""
    q, k, v = _inputs(2, 4, 4, 60, 16, torch.float32, seed=5)
    qkv, cos, sin, kv = _qkv_inputs(2, 4, 4, 60, 16, torch.float32, seed=6)
    for p, window in [(0, 0), (37, 0), (59, 20)]:
        pos = torch.tensor([p], device=DEV)
        out = da.decode_attention_triton(q, k, v, pos, window, blocks=blocks)
        assert _rel_err(out, da.decode_attention_reference(q, k, v, pos, window)) < 1e-5, p
        kv_ref = kv.clone()
        out = da.decode_attention_rope_triton(qkv, cos, sin, kv, pos, 4, window, blocks=blocks)
        ref = da.decode_attention_rope_reference(qkv, cos, sin, kv_ref, pos, 4, window)
        assert _rel_err(out, ref) < 1e-5 and torch.allclose(kv, kv_ref, rtol=1e-6, atol=1e-6), p
        assert (da.arrival_counters(DEV, 8)[:8] == 0).all()


def test_reference_matches_naive_softmax():
    q, k, v = _inputs(2, 6, 2, 41, 16, torch.float32, seed=1)
    for p, window in [(0, 0), (20, 0), (40, 0), (40, 7), (3, 7)]:
        ref = da.decode_attention_reference(q, k, v, torch.tensor([p], device=DEV), window)
        assert _rel_err(ref, _naive(q, k, v, p, window)) < 1e-6


@pytest.mark.parametrize("dtype,Hkv", [(torch.bfloat16, 2), (torch.bfloat16, 8), (torch.float16, 2)])
def test_half_precision_inputs(dtype, Hkv):
    q, k, v = _inputs(1, 8, Hkv, 100, 32, dtype, seed=2)
    for p, window in [(0, 0), (57, 0), (99, 0), (99, 30)]:
        pos = torch.tensor([p], device=DEV)
        out = da.decode_attention_triton(q, k, v, pos, window, blocks=SMALL)
        assert out.dtype == dtype and not out.isnan().any()
        assert _rel_err(out, da.decode_attention_reference(q, k, v, pos, window)) < TOL[dtype]


def test_default_blocks_and_strided_query():
    """The default tiling, and q as the model makes it: a transposed view of [B, T, H, D]."""
    B, H, Hkv, S, D = 1, 4, 2, 300, 32
    q_bthd = torch.randn(B, 1, H, D, device=DEV)
    _, k, v = _inputs(B, H, Hkv, S, D, torch.float32, seed=4)
    q = q_bthd.transpose(1, 2)
    for p in (5, 200, 299):
        pos = torch.tensor([p], device=DEV)
        out = da.decode_attention_triton(q, k, v, pos, None)
        assert _rel_err(out, da.decode_attention_reference(q, k, v, pos, None)) < 1e-5


def test_custom_op_under_torch_compile():
    """The custom op (reference on CPU, Triton on CUDA) inside a fullgraph-compiled step, with
    the cache written in place just before (as KVCache.update does)."""
    B, H, Hkv, S, D = 1, 4, 2, 50, 16
    q, k, v = _inputs(B, H, Hkv, S, D, torch.float32, seed=5)
    new_k, new_v = torch.randn(B, Hkv, 1, D, device=DEV), torch.randn(B, Hkv, 1, D, device=DEV)

    def step(q, k_cache, v_cache, pos):
        k_cache.index_copy_(2, pos, new_k)
        v_cache.index_copy_(2, pos, new_v)
        return da.decode_attention(q * 2, k_cache, v_cache, pos, 8) + 1

    # aot_eager traces with fake tensors (what checks the registration) without inductor's C++ build
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    pos = torch.tensor([10], device=DEV)
    for _ in range(2):  # a new position must not need a new graph
        k_ref, v_ref = k.clone(), v.clone()
        out = compiled(q, k, v, pos)
        expected = step(q, k_ref, v_ref, pos)
        assert torch.equal(k, k_ref)
        assert _rel_err(out, expected) < 1e-6
        pos = pos + 17
    torch.library.opcheck(torch.ops.catsgen.decode_attention.default, (q, k, v, torch.tensor([30], device=DEV), 0))


def _qkv_inputs(B, H, Hkv, S, D, dtype, seed):
    """A new token's W_qkv output, RoPE cos/sin rows at some angle, and a cache of random contents."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, 1, (H + 2 * Hkv) * D, generator=g).to(DEV, dtype)
    angle = torch.rand(S, D // 2, generator=g) * 6.3  # RoPE tables: a row per cache position
    cos, sin = torch.cat((angle, angle), -1).cos().to(DEV), torch.cat((angle, angle), -1).sin().to(DEV)
    kv = torch.randn(2, B, Hkv, S, D, generator=g).to(DEV, dtype)
    return qkv, cos, sin, kv


@pytest.mark.parametrize("B,H,Hkv,S,D,dtype", [(1, 4, 4, 83, 16, torch.float32), (3, 6, 2, 83, 32, torch.float32),
                                               (2, 8, 1, 70, 16, torch.bfloat16), (1, 6, 3, 77, 24, torch.float32),
                                               (8, 4, 2, 50, 16, torch.float16)])
@pytest.mark.parametrize("window", [0, 40])
def test_fused_rope_and_cache_write_match_reference(B, H, Hkv, S, D, dtype, window):
    """One launch: RoPE on q and the new key, the new key and value written at pos (every other
    cache entry untouched), attention over the allowed keys including the new one."""
    qkv, cos, sin, kv = _qkv_inputs(B, H, Hkv, S, D, dtype, seed=B + H + S + D)
    for p in (0, 31, 32, 47, S - 1):
        pos = torch.tensor([p], device=DEV)
        kv_ref = kv.clone()
        out = da.decode_attention_rope_triton(qkv, cos, sin, kv, pos, H, window, blocks=SMALL)
        ref = da.decode_attention_rope_reference(qkv, cos, sin, kv_ref, pos, H, window)
        assert out.shape == (B, H, 1, D) and out.dtype == dtype
        assert _rel_err(out, ref) < (1e-5 if dtype == torch.float32 else TOL[dtype]), p
        exact = dtype == torch.float32  # bf16: the kernel's fused multiply-add may round one ulp apart
        assert torch.allclose(kv.float(), kv_ref.float(), rtol=1e-6 if exact else 1e-2, atol=1e-6 if exact else 1e-5)
        assert not torch.equal(kv[:, :, :, p], torch.zeros_like(kv[:, :, :, p]))
        assert (da.arrival_counters(DEV, B * Hkv)[:B * Hkv] == 0).all()


def test_fused_reference_is_rope_then_cache_write_then_attention():
    """The fused reference against the unfused steps written out: HF rotate-half by hand on q and
    k, the cache written by index assignment, decode_attention_reference over it."""
    B, H, Hkv, S, D = 2, 4, 2, 30, 8
    qkv, cos, sin, kv = _qkv_inputs(B, H, Hkv, S, D, torch.float32, seed=9)
    heads = qkv.view(B, H + 2 * Hkv, D)
    rot = lambda x: x * cos[12] + torch.cat((-x[..., D // 2:], x[..., :D // 2]), -1) * sin[12]  # noqa: E731
    q, k, v = rot(heads[:, :H]), rot(heads[:, H:H + Hkv]), heads[:, H + Hkv:]
    kv_ref = kv.clone()
    kv_ref[0, :, :, 12], kv_ref[1, :, :, 12] = k, v
    pos = torch.tensor([12], device=DEV)
    expected = da.decode_attention_reference(q[:, :, None], kv_ref[0], kv_ref[1], pos, None)
    out = da.decode_attention_rope_reference(qkv, cos, sin, kv, pos, H, None)
    assert torch.equal(kv, kv_ref)
    assert _rel_err(out, expected) < 1e-6


def test_fused_op_under_torch_compile():
    """The mutating custom op inside a fullgraph-compiled step: the cache written in place."""
    B, H, Hkv, S, D = 1, 4, 2, 50, 16
    qkv, cos, sin, kv = _qkv_inputs(B, H, Hkv, S, D, torch.float32, seed=6)
    step = lambda qkv, kv, pos: da.decode_attention_rope(qkv * 2, cos, sin, kv, pos, H, 8) + 1  # noqa: E731
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    pos = torch.tensor([10], device=DEV)
    for _ in range(2):
        kv_ref = kv.clone()
        out = compiled(qkv, kv, pos)
        expected = step(qkv, kv_ref, pos)
        assert torch.equal(kv, kv_ref)
        assert _rel_err(out, expected) < 1e-6
        pos = pos + 17
    torch.library.opcheck(torch.ops.catsgen.decode_attention_rope.default, (qkv, cos, sin, kv.clone(), torch.tensor([30], device=DEV), H, 0))
