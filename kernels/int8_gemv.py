"""int8 weight-only GEMV for decode (B = 1..16 rows of x), as the custom op catsgen::int8_gemv
(Triton on CUDA, the torch reference elsewhere; more rows, as in prefill, through cuBLAS).

y [B, N] = x [B, K] @ (q [N, K] * scale [N, None]).T: q int8 per output channel (row), scale
float32 (catsgen/quantize.py). For the dense projections (W_qkv, W_o) and any dense matrix.

Batch-1 decoding is memory-bound, so the kernel is about reading q once, wide and coalesced: a
program owns BLOCK_N whole rows (and, with split_k > 1, one of split_k ranges of columns) and
walks along K in [BLOCK_N, BLOCK_K] int8 tiles (BLOCK_K contiguous bytes per row); each tile is
converted to x's dtype in registers (exact: |q| <= 127) and multiplied on the tensor cores with
x padded to 16 tokens (the CATS MLP kernels' tile helper, tiles.py), accumulating in fp32. The
row scales multiply the accumulator once at the end. split_k > 1 writes fp32 partials
[split_k, B, N] summed by torch (one more launch): for shapes with few rows; with N >= 4096 and
BLOCK_N = 16 there are already 256+ programs, so the default is 1.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    from .tiles import rows_times_x, rows_times_x1
except ImportError:  # no Triton (e.g. macOS): the op still runs, through the reference
    triton = None

__all__ = ["int8_gemv", "int8_gemv_reference", "int8_gemv_triton", "int8_mlp", "int8_mlp_reference",
           "int8_mlp_triton", "GemvBlocks", "pick_gemv_blocks", "MAX_ROWS"]


MAX_ROWS = 16  # tokens are padded to 16 for tl.dot


def int8_gemv_reference(x, q, scale):
    """x [B, K] @ (q [N, K] * scale [N, None]).T in fp32, returned in x.dtype."""
    return ((x.float() @ q.float().t()) * scale.float()).to(x.dtype)


@dataclass(frozen=True)
class GemvBlocks:
    """Tiles of the int8 GEMV (tuned per shape: TUNED_GEMV_BLOCKS).
    block_n: rows per program (>= 16, a tl.dot operand; N=4096 gives 256 programs, 2 per SM);
    block_k: int8 columns per step (512 bytes a row, 8 KB a tile); split_k: column ranges per
    row block (> 1: fp32 partials summed by torch, one launch more); Triton's num_warps, num_stages;
    fma_at_b1: with B = 1, multiply-add on the FMA units instead of a tl.dot with x padded to 16
    tokens (which of the two is faster is for the GPU sweep to say)."""
    block_n: int = 16
    block_k: int = 512
    split_k: int = 1
    warps_and_stages: tuple[int, int] = (4, 4)
    fma_at_b1: bool = False
    magic: bool = True


DEFAULT_GEMV_BLOCKS = GemvBlocks()
# B = 1: one token on the FMA units, (N, K) -> tiles from the H200 sweep (scripts/gpu_int8.py
# --sweep, notes/kernels.md int8 v2); any other shape takes B1_GEMV_BLOCKS.
B1_GEMV_BLOCKS = GemvBlocks(block_n=4, block_k=1024, split_k=1, warps_and_stages=(4, 1), fma_at_b1=True)
TUNED_GEMV_BLOCKS: dict[tuple[int, int], GemvBlocks] = {
    (12288, 4096): GemvBlocks(block_n=2, block_k=1024, warps_and_stages=(2, 1), fma_at_b1=True),  # Llama-2-7B W_qkv
    (11008, 4096): GemvBlocks(block_n=2, block_k=1024, warps_and_stages=(2, 1), fma_at_b1=True),  # W_gate, W_up
    (4096, 4096): B1_GEMV_BLOCKS,  # W_o
    (4096, 11008): GemvBlocks(block_n=4, block_k=1024, warps_and_stages=(4, 3), fma_at_b1=True),  # W_down
}
# B > 1: x padded to 16 tokens for tl.dot (the FMA variant measured 38 us against 27 us for bf16
# cuBLAS at B = 4, session 4)
DOT_GEMV_BLOCKS = GemvBlocks(block_n=32, block_k=512, split_k=1, warps_and_stages=(4, 4))


def pick_gemv_blocks(N: int, K: int, B: int = 1) -> GemvBlocks:
    if B > 1:
        return DOT_GEMV_BLOCKS
    return TUNED_GEMV_BLOCKS.get((N, K), B1_GEMV_BLOCKS)


if triton is not None:
    @triton.jit
    def _int8_gemv_kernel(x_ptr, q_ptr, s_ptr, q2_ptr, s2_ptr, out_ptr, B, N, N2, K, K_PER_SPLIT,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr,
                          FMA: tl.constexpr, EVEN: tl.constexpr, MAGIC: tl.constexpr, PAIR: tl.constexpr,
                          GATED: tl.constexpr):
        """PAIR: the programs past q's rows multiply x by q2 [N2, K] (scales s2) and write columns
        N.. of out [B, N + N2]: two GEMVs of the same x in one launch. GATED (FMA only): x is the
        pair [a, b] of a PAIR launch and the GEMV multiplies by SiLU(a) * b."""
        pid = tl.program_id(0)
        w_ptr, sc_ptr, n_rows, col0, block = q_ptr, s_ptr, N, 0, pid
        if PAIR:
            if pid >= tl.cdiv(N, BLOCK_N):
                w_ptr, sc_ptr, n_rows, col0, block = q2_ptr, s2_ptr, N2, N, pid - tl.cdiv(N, BLOCK_N)
        rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(1)
        row_ok = rows < n_rows
        k_lo = split * K_PER_SPLIT
        k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
        toks = tl.arange(0, 16)
        if FMA:  # B = 1: one token, no tl.dot
            acc1 = rows_times_x1(w_ptr, x_ptr, rows, row_ok, K, k_lo, k_hi, BLOCK_N, BLOCK_K, EVEN, MAGIC, GATED)
            acc = tl.where(toks[None, :] == 0, acc1[:, None], 0.0)  # [BLOCK_N, 16], token 0 only
        else:
            acc = rows_times_x(w_ptr, x_ptr, rows, row_ok, B, K, k_lo, k_hi, BLOCK_N, BLOCK_K, DOT_F32)
        acc = acc * tl.load(sc_ptr + rows, mask=row_ok, other=0.0)[:, None]
        width = N + N2
        tl.store(out_ptr + split * B * width + toks[None, :] * width + col0 + rows[:, None],
                 acc.to(out_ptr.dtype.element_ty), mask=(toks < B)[None, :] & row_ok[:, None])


def int8_gemv_triton(x, q, scale, blocks: GemvBlocks | None = None, q2=None, scale2=None, gated: bool = False):
    """The Triton path (same contract as int8_gemv_reference). On CPU tensors it needs
    TRITON_INTERPRET=1 set before triton was imported.
    q2, scale2: a second weight [N2, K] of the same x in the same launch: y [B, N + N2].
    gated (B = 1, FMA tiles): x is [1, 2K] = [a, b] and the GEMV takes SiLU(a) * b."""
    B = x.shape[0]
    K = x.shape[1] // 2 if gated else x.shape[1]
    N = q.shape[0]
    N2 = 0 if q2 is None else q2.shape[0]
    assert 1 <= B <= MAX_ROWS, "decode kernel: tokens are padded to 16"
    assert q.shape == (N, K) and q.dtype == torch.int8 and q.is_contiguous()
    assert scale.shape == (N,) and scale.dtype == torch.float32
    assert q2 is None or (q2.shape == (N2, K) and q2.dtype == torch.int8 and q2.is_contiguous()
                          and scale2.shape == (N2,) and scale2.dtype == torch.float32)
    x = x.contiguous()
    blocks = blocks or pick_gemv_blocks(N, K, B)
    assert not gated or (B == 1 and blocks.fma_at_b1 and x.shape[1] == 2 * K), "gated: one token, FMA tiles"
    split_k = max(1, min(blocks.split_k, triton.cdiv(K, blocks.block_k)))
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), blocks.block_k) * blocks.block_k
    split_k = triton.cdiv(K, k_per_split)  # no empty split
    # split_k > 1: fp32 partials [split_k, B, N]; else y itself (not a view: the op returns it)
    shape, dtype = ((B, N + N2), x.dtype) if split_k == 1 else ((split_k, B, N + N2), torch.float32)
    out = torch.empty(shape, device=x.device, dtype=dtype)
    n_programs = triton.cdiv(N, blocks.block_n) + triton.cdiv(N2, blocks.block_n)
    _int8_gemv_kernel[(n_programs, split_k)](
        x, q, scale, q if q2 is None else q2, scale if q2 is None else scale2, out, B, N, N2, K, k_per_split,
        BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k,
        DOT_F32=x.dtype == torch.float32 or not x.is_cuda, FMA=blocks.fma_at_b1 and B == 1,
        EVEN=K % k_per_split == 0 and k_per_split % blocks.block_k == 0, MAGIC=blocks.magic,
        PAIR=q2 is not None, GATED=gated, num_warps=blocks.warps_and_stages[0],
        num_stages=blocks.warps_and_stages[1])
    return out if split_k == 1 else out.sum(0).to(x.dtype)


def int8_mlp_triton(x, q_gate, s_gate, q_up, s_up, q_down, s_down):
    """The dense MLP on int8 weights for one token in two launches: [W_gate x, W_up x] as one PAIR
    GEMV, then W_down (SiLU(g) * u) as a GATED GEMV (q_down [d, f], as checkpoints store W_down)."""
    gu = int8_gemv_triton(x, q_gate, s_gate, q2=q_up, scale2=s_up)
    return int8_gemv_triton(gu, q_down, s_down, gated=True)


@torch.library.custom_op("catsgen::int8_gemv", mutates_args=())
def _int8_gemv_op(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if x.is_cuda and x.shape[0] <= MAX_ROWS:
        return int8_gemv_triton(x, q, scale)
    if x.is_cuda:  # prefill: many tokens, compute-bound; cuBLAS on a transient x.dtype copy of q
        return (F.linear(x, q.to(x.dtype)) * scale).to(x.dtype)
    return int8_gemv_reference(x, q, scale)


@_int8_gemv_op.register_fake
def _(x, q, scale):
    return x.new_empty(x.shape[0], q.shape[0])


def int8_mlp_reference(x, q_gate, s_gate, q_up, s_up, q_down, s_down):
    """The dense MLP on int8 weights as three reference GEMVs (the definition of int8_mlp)."""
    g, u = int8_gemv_reference(x, q_gate, s_gate), int8_gemv_reference(x, q_up, s_up)
    return int8_gemv_reference(F.silu(g) * u, q_down, s_down)


@torch.library.custom_op("catsgen::int8_mlp", mutates_args=())
def _int8_mlp_op(x: torch.Tensor, q_gate: torch.Tensor, s_gate: torch.Tensor, q_up: torch.Tensor,
                 s_up: torch.Tensor, q_down: torch.Tensor, s_down: torch.Tensor) -> torch.Tensor:
    args = (q_gate, s_gate, q_up, s_up, q_down, s_down)
    if x.is_cuda:  # decode only (the model's prefill takes int8_gemv)
        return int8_mlp_triton(x, *args) if x.shape[0] == 1 else _int8_gemv_mlp_triton(x, *args)
    return int8_mlp_reference(x, *args)


@_int8_mlp_op.register_fake
def _(x, q_gate, s_gate, q_up, s_up, q_down, s_down):
    return x.new_empty(x.shape[0], q_down.shape[0])


def int8_mlp(x, q_gate, s_gate, q_up, s_up, q_down, s_down, use_triton: bool | None = None):
    """y [B, d] = W_down (SiLU(W_gate x) * (W_up x)) on int8 weights (q_down [d, f]), in x.dtype.
    One token on CUDA: two launches (int8_mlp_triton). use_triton as for int8_gemv."""
    args = (q_gate, s_gate, q_up, s_up, q_down, s_down)
    if use_triton:
        return int8_mlp_triton(x, *args) if x.shape[0] == 1 else _int8_gemv_mlp_triton(x, *args)
    if use_triton is False:
        return int8_mlp_reference(x, *args)
    return torch.ops.catsgen.int8_mlp(x, *args)


def _int8_gemv_mlp_triton(x, q_gate, s_gate, q_up, s_up, q_down, s_down):
    """Several tokens: three tl.dot GEMVs, SiLU * mul in torch."""
    g, u = int8_gemv_triton(x, q_gate, s_gate), int8_gemv_triton(x, q_up, s_up)
    return int8_gemv_triton(F.silu(g) * u, q_down, s_down)


def int8_gemv(x, q, scale, use_triton: bool | None = None):
    """y [..., N] = x [..., K] @ (q [N, K] * scale [N, None]).T in x.dtype (fp32 accumulation).
    The Triton kernel takes up to MAX_ROWS rows of x (decode); the op runs more (prefill) through
    cuBLAS on CUDA.

    use_triton: None (default) runs the custom op: Triton on CUDA, the reference elsewhere.
    True forces the Triton path (CPU tensors need TRITON_INTERPRET=1 set before triton is
    imported); False forces the reference."""
    rows = x.reshape(-1, x.shape[-1])
    if use_triton:
        y = int8_gemv_triton(rows, q, scale)
    elif use_triton is False:
        y = int8_gemv_reference(rows, q, scale)
    else:
        y = torch.ops.catsgen.int8_gemv(rows, q, scale)
    return y.reshape(*x.shape[:-1], q.shape[0])
