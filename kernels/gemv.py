"""The decode GEMV (B = 1..16 rows of x), one Triton kernel behind two custom ops:
  catsgen::int8_gemv  int8 weight-only y = x @ (q * scale).T (Triton on CUDA, the torch reference
                      elsewhere; more rows, as in prefill, through cuBLAS; autograd for the fisher
                      calibration's backward);
  catsgen::gemv       decode only (the model's kernel path, catsgen/linear.py): float or int8
                      weights, and work folded in around the product: the residual add in the
                      epilogue (W_o), or the gated SiLU(x W_gate^T) * (x W_up^T) of the dense MLP
                      (the same rows of both matrices in one program, x from L1). Each needs the
                      whole of K in one program. (The block's RMSNorm folded in here measured
                      slower than the norm kernel it replaced and was removed: notes/kernels.md v7.)

y [B, N] = x [B, K] @ (q [N, K] * scale [N, None]).T: q int8 per output channel (row), scale
float32 (catsgen/quantize.py).

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
from typing import Optional

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    from .tiles import rows_times_x, rows_times_x1
    from .to_f32 import EXACT_INT8, PLAIN
except ImportError:  # no Triton (e.g. macOS): the op still runs, through the reference
    triton = None

__all__ = ["gemv", "gemv_reference", "gemv_triton", "int8_gemv", "int8_gemv_reference", "int8_gemv_triton",
           "GemvBlocks", "pick_gemv_blocks", "MAX_ROWS"]


MAX_ROWS = 16  # tokens are padded to 16 for tl.dot


def int8_gemv_reference(x, q, scale):
    """x [B, K] @ (q [N, K] * scale [N, None]).T in fp32, returned in x.dtype."""
    return ((x.float() @ q.float().t()) * scale.float()).to(x.dtype)


@dataclass(frozen=True)
class GemvBlocks:
    """Tiles of the GEMV (int8: tuned per shape, TUNED_GEMV_BLOCKS; float: FLOAT_B1_GEMV_BLOCKS).
    block_n: rows per program (>= 16, a tl.dot operand; N=4096 gives 256 programs, 2 per SM);
    block_k: int8 columns per step (512 bytes a row, 8 KB a tile); split_k: column ranges per
    row block (> 1: fp32 partials summed by torch, one launch more); Triton's num_warps, num_stages;
    fma_at_b1: with B = 1, multiply-add on the FMA units instead of a tl.dot with x padded to 16
    tokens (which of the two is faster is for the GPU sweep to say); sub (FMA only): products summed
    over runs of sub adjacent columns each step, 0 = a [block_n, block_k] accumulator (tiles.py)."""
    block_n: int = 16
    block_k: int = 512
    split_k: int = 1
    warps_and_stages: tuple[int, int] = (4, 4)
    fma_at_b1: bool = False
    magic: bool = True
    sub: int = 0


# B = 1: one token on the FMA units, (N, K) -> tiles from the H200 sweep (scripts/gpu_int8.py
# --sweep, notes/kernels.md int8 v2); any other shape takes B1_GEMV_BLOCKS.
B1_GEMV_BLOCKS = GemvBlocks(block_n=4, block_k=1024, split_k=1, warps_and_stages=(4, 1), fma_at_b1=True, sub=16)
TUNED_GEMV_BLOCKS: dict[tuple[int, int], GemvBlocks] = {  # session 8's sweep (notes/kernels.md v8)
    (12288, 4096): GemvBlocks(block_n=4, block_k=512, warps_and_stages=(2, 2), fma_at_b1=True, sub=16),  # W_qkv
    (11008, 4096): GemvBlocks(block_n=4, block_k=512, warps_and_stages=(2, 2), fma_at_b1=True, sub=16),  # gate, up
    (4096, 4096): B1_GEMV_BLOCKS,  # W_o
    (4096, 11008): B1_GEMV_BLOCKS,  # W_down
}
# B > 1: x padded to 16 tokens for tl.dot (the FMA variant measured 38 us against 27 us for bf16
# cuBLAS at B = 4, session 4)
DOT_GEMV_BLOCKS = GemvBlocks(block_n=32, block_k=512, split_k=1, warps_and_stages=(4, 4))


# Float weights, B = 1: the H200 sweep of Llama-2-7B's four shapes (scripts/gpu_int8.py --float-gemv,
# notes/kernels.md v8): the best tiling at each shape, faster than cuBLAS at each (W_qkv 25.7 us
# against 27.6, W_o 10.2 against 13.5 with its split-K reduce). More tokens: tl.dot tiles
# (DOT_GEMV_BLOCKS); the model sends float weights there only in tests (linear.py keeps cuBLAS
# for several tokens).
FLOAT_B1_GEMV_BLOCKS = GemvBlocks(block_n=2, block_k=1024, split_k=1, warps_and_stages=(4, 1), fma_at_b1=True,
                                  magic=False, sub=8)


# The gated GEMV (two rows of weights per output row) for one token, int8: its own sweep
# (scripts/gpu_int8.py --gated, notes/kernels.md v8).
INT8_GATED_B1_BLOCKS = GemvBlocks(block_n=2, block_k=1024, split_k=1, warps_and_stages=(2, 1), fma_at_b1=True, sub=16)


def pick_gemv_blocks(N: int, K: int, B: int = 1, int8: bool = True, gated: bool = False) -> GemvBlocks:
    if B > 1:
        return DOT_GEMV_BLOCKS
    if not int8:
        return FLOAT_B1_GEMV_BLOCKS
    if gated:
        return INT8_GATED_B1_BLOCKS
    return TUNED_GEMV_BLOCKS.get((N, K), B1_GEMV_BLOCKS)


if triton is not None:
    @triton.jit
    def _rows_product(w_ptr, s_ptr, x_ptr, rows, row_ok, B, K, k_lo, k_hi, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, FMA: tl.constexpr, EVEN: tl.constexpr,
                      MAGIC: tl.constexpr, SCALED: tl.constexpr, SUB: tl.constexpr):
        """[BLOCK_N, 16] fp32 = rows of W times x's tokens, scaled for int8."""
        toks = tl.arange(0, 16)
        if SCALED:  # int8: the rows' scales, loaded before the loop (not at the program's end)
            s_rows = tl.load(s_ptr + rows, mask=row_ok, other=0.0)
        if FMA:  # B = 1: one token, no tl.dot
            acc1, _ = rows_times_x1(w_ptr, x_ptr, rows, row_ok, K, k_lo, k_hi, BLOCK_N, BLOCK_K, EVEN, MAGIC,
                                    x_ptr, False, SUB)
            acc = tl.where(toks[None, :] == 0, acc1[:, None], 0.0)  # [BLOCK_N, 16], token 0 only
        else:
            acc, _ = rows_times_x(w_ptr, x_ptr, rows, row_ok, B, K, k_lo, k_hi, BLOCK_N, BLOCK_K, DOT_F32,
                                  x_ptr, False)
        if SCALED:
            acc = acc * s_rows[:, None]
        return acc

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, s_ptr, up_ptr, s_up_ptr, res_ptr, out_ptr, B, N, K, K_PER_SPLIT,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr,
                     FMA: tl.constexpr, EVEN: tl.constexpr, MAGIC: tl.constexpr, SCALED: tl.constexpr,
                     RESIDUAL: tl.constexpr, GATED: tl.constexpr, SUB: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(1)
        row_ok = rows < N
        k_lo = split * K_PER_SPLIT
        k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
        toks = tl.arange(0, 16)
        out_mask = (toks < B)[None, :] & row_ok[:, None]
        if RESIDUAL:  # loaded before the loop, so its round trip is not added to the program's end
            res = tl.load(res_ptr + toks[None, :] * N + rows[:, None], mask=out_mask, other=0.0).to(tl.float32)
        acc = _rows_product(w_ptr, s_ptr, x_ptr, rows, row_ok, B, K, k_lo, k_hi, BLOCK_N, BLOCK_K,
                            DOT_F32, FMA, EVEN, MAGIC, SCALED, SUB)
        if GATED:  # the dense MLP's SiLU(x W_gate^T) * (x W_up^T): the same rows of W_up, x read from L1
            up = _rows_product(up_ptr, s_up_ptr, x_ptr, rows, row_ok, B, K, k_lo, k_hi, BLOCK_N, BLOCK_K,
                               DOT_F32, FMA, EVEN, MAGIC, SCALED, SUB)
            acc = acc * tl.sigmoid(acc) * up
        if RESIDUAL:  # the residual stream's add, in fp32 before the one rounding (split_k = 1)
            acc += res
        tl.store(out_ptr + split * B * N + toks[None, :] * N + rows[:, None], acc.to(out_ptr.dtype.element_ty),
                 mask=out_mask)


def gemv_triton(x, w, scale=None, residual=None, up=None, blocks: GemvBlocks | None = None):
    """The Triton path (same contract as gemv_reference). On CPU tensors it needs
    TRITON_INTERPRET=1 set before triton was imported."""
    B, K = x.shape
    N = w.shape[0]
    int8 = w.dtype == torch.int8
    assert 1 <= B <= MAX_ROWS, "decode kernel: tokens are padded to 16"
    assert w.shape == (N, K) and w.is_contiguous() and int8 == (scale is not None)
    w_up, s_up = up if up is not None else (w, scale)  # unread without GATED
    assert w_up.shape == w.shape and w_up.dtype == w.dtype and w_up.is_contiguous() and (s_up is None) == (scale is None)
    assert scale is None or (scale.shape == (N,) and scale.dtype == torch.float32)
    assert residual is None or residual.shape == (B, N)
    x = x.contiguous()
    blocks = blocks or pick_gemv_blocks(N, K, B, int8, gated=up is not None)
    # the residual's add and SiLU need the whole sum: no split of K then
    whole_k = residual is not None or up is not None
    split_k = 1 if whole_k else max(1, min(blocks.split_k, triton.cdiv(K, blocks.block_k)))
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), blocks.block_k) * blocks.block_k
    split_k = triton.cdiv(K, k_per_split)  # no empty split
    # split_k > 1: fp32 partials [split_k, B, N]; else y itself (not a view: the op returns it)
    shape, dtype = ((B, N), x.dtype) if split_k == 1 else ((split_k, B, N), torch.float32)
    out = torch.empty(shape, device=x.device, dtype=dtype)
    _gemv_kernel[(triton.cdiv(N, blocks.block_n), split_k)](
        x, w, x if scale is None else scale, w_up, x if s_up is None else s_up,
        x if residual is None else residual.contiguous(), out,
        B, N, K, k_per_split, BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k,
        DOT_F32=x.dtype == torch.float32 or not x.is_cuda, FMA=blocks.fma_at_b1 and B == 1,
        EVEN=K % k_per_split == 0 and k_per_split % blocks.block_k == 0,
        MAGIC=(EXACT_INT8 if blocks.magic and int8 else PLAIN).value,
        SCALED=int8, RESIDUAL=residual is not None, GATED=up is not None, SUB=blocks.sub,
        num_warps=blocks.warps_and_stages[0], num_stages=blocks.warps_and_stages[1])
    return out if split_k == 1 else out.sum(0).to(x.dtype)


def int8_gemv_triton(x, q, scale, blocks: GemvBlocks | None = None):
    """The Triton path of int8_gemv (same contract as int8_gemv_reference)."""
    assert q.dtype == torch.int8
    return gemv_triton(x, q, scale, blocks=blocks)


def gemv_reference(x, w, scale=None, residual=None, up=None):
    """y [B, N] = x [B, K] @ W.T (+ residual), in x.dtype: W = w (float) or w * scale[:, None]
    (int8 w, fp32 scale per row). The product in fp32, rounded to x.dtype before the residual's
    add (the model's torch path; the kernel adds in fp32 and rounds once). up = (w_up, s_up):
    y = SiLU(x W.T) * (x W_up.T) instead (the dense MLP's first half; rounded as the torch path
    rounds, the kernel once)."""
    y = x.float() @ w.float().t()
    y = (y if scale is None else y * scale.float()).to(x.dtype)
    if up is not None:
        y = torch.nn.functional.silu(y) * gemv_reference(x, *up)
    return y if residual is None else y + residual


@torch.library.custom_op("catsgen::gemv", mutates_args=())
def _gemv_op(x: torch.Tensor, w: torch.Tensor, scale: Optional[torch.Tensor], residual: Optional[torch.Tensor],
             w_up: Optional[torch.Tensor], s_up: Optional[torch.Tensor]) -> torch.Tensor:
    up = None if w_up is None else (w_up, s_up)
    if x.is_cuda:
        return gemv_triton(x, w, scale, residual, up)
    return gemv_reference(x, w, scale, residual, up)


@_gemv_op.register_fake
def _(x, w, scale, residual, w_up, s_up):
    return x.new_empty(x.shape[0], w.shape[0])


def gemv(x, w, scale=None, residual=None, up=None, use_triton: bool | None = None):
    """The decode GEMV (at most MAX_ROWS rows of x [..., K]): y [..., N] = x @ W.T (+ residual),
    float or int8 weights; or, with up = (w_up, s_up), the gated SiLU(x W.T) * (x W_up.T): the
    contract is gemv_reference's. use_triton as in int8_gemv."""
    rows = x.reshape(-1, x.shape[-1])
    res = None if residual is None else residual.reshape(-1, w.shape[0])
    if use_triton:
        y = gemv_triton(rows, w, scale, res, up)
    elif use_triton is False:
        y = gemv_reference(rows, w, scale, res, up)
    else:
        w_up, s_up = up if up is not None else (None, None)
        y = torch.ops.catsgen.gemv(rows, w, scale, res, w_up, s_up)
    return y.reshape(*x.shape[:-1], w.shape[0])


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


# Autograd, so that a backward runs through the int8 linears (calibrate --quantize int8: the
# fisher allocation's gradients of the MLP outputs). Only x gets a gradient: q and scale are
# frozen weights. d x = grad @ (q * scale[:, None]), dequantized in fp32, in grad's dtype.
def _int8_gemv_setup_context(ctx, inputs, output):
    _, q, scale = inputs
    ctx.save_for_backward(q, scale)


def _int8_gemv_backward(ctx, grad):
    q, scale = ctx.saved_tensors
    return (grad.float() @ (q.float() * scale.float()[:, None])).to(grad.dtype), None, None


torch.library.register_autograd("catsgen::int8_gemv", _int8_gemv_backward, setup_context=_int8_gemv_setup_context)
