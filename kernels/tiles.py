"""Triton tile helpers shared by the decode GEMV kernels (CATS MLP, int8 GEMV).

Tokens are padded to 16 so each step is one tl.dot on the tensor cores (FMA units for fp32).
Weights may be float or int8: a weight tile is converted to x's dtype in registers before the
dot (exact for int8, |q| <= 127); the caller applies int8 scales to the fp32 result.
"""
import triton
import triton.language as tl


@triton.jit
def dot(a, b, acc, DOT_F32: tl.constexpr):
    if DOT_F32:  # fp32 inputs; also under Triton's interpreter, whose bf16 tl.dot is wrong (3.9)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def as_operand(w, dtype, DOT_F32: tl.constexpr):
    """A weight tile as a dot operand of `dtype` (int8 -> float is exact); straight to fp32 under
    DOT_F32 (the interpreter's int8 -> bf16 conversion gives NaNs, triton 3.9)."""
    if DOT_F32:
        return w.to(tl.float32)
    else:
        return w.to(dtype)


@triton.jit
def rows_times_x(w_ptr, x_ptr, rows, row_mask, B, D, k_lo, k_hi,
                 BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr):
    """[BLOCK_F, 16] fp32 = w[rows, k_lo:k_hi] @ x[:, k_lo:k_hi]^T (w rows of length D, tokens
    padded to 16); rows outside row_mask are not read."""
    toks = tl.arange(0, 16)
    acc = tl.zeros([BLOCK_F, 16], tl.float32)
    for k in range(k_lo, k_hi, BLOCK_D):
        cols = k + tl.arange(0, BLOCK_D)
        w = tl.load(w_ptr + rows[:, None] * D + cols[None, :], mask=row_mask[:, None] & (cols < k_hi)[None, :],
                    other=0, eviction_policy="evict_first")  # weights are read once: leave L2 to x, v, h, y
        xt = tl.load(x_ptr + toks[None, :] * D + cols[:, None], mask=(toks < B)[None, :] & (cols < k_hi)[:, None],
                     other=0.0)
        acc = dot(as_operand(w, xt.dtype, DOT_F32), xt, acc, DOT_F32)
    return acc
