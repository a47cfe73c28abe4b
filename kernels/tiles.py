"""Triton tile helpers shared by the decode GEMV kernels (CATS MLP, int8 GEMV).

Tokens are padded to 16 so each step is one tl.dot on the tensor cores (FMA units for fp32).
Weights may be float or int8: a weight tile is converted to x's dtype in registers before the
dot (exact for int8, |q| <= 127); the caller applies int8 scales to the fp32 result.
One token (B = 1) can skip the padding: rows_times_x1 multiplies on the FMA units in fp32 and
converts int8 without the I2F unit (kernels/to_f32.py).
NORM: x is the residual stream and the matrix wants RMSNorm(x) * g: each x tile is multiplied by
g's tile (g_ptr) and its squares summed along the way, so the caller, which walked all of x, scales
its result by 1 / rms itself (rsqrt_mean) and no norm kernel runs before it.
"""
import triton
import triton.language as tl

from .to_f32 import OFFSET, OFFSET_INT8, as_f32


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
                 BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr,
                 g_ptr, NORM: tl.constexpr):
    """([BLOCK_F, 16] fp32 = w[rows, k_lo:k_hi] @ x[:, k_lo:k_hi]^T, [16] the tokens' sums of x^2
    over the columns (NORM; else 0)): w rows of length D, tokens padded to 16; rows outside
    row_mask are not read. NORM: x * g in place of x."""
    toks = tl.arange(0, 16)
    acc = tl.zeros([BLOCK_F, 16], tl.float32)
    squares = tl.zeros([BLOCK_D, 16], tl.float32)  # summed across columns once, after the loop
    for k in range(k_lo, k_hi, BLOCK_D):
        cols = k + tl.arange(0, BLOCK_D)
        w = tl.load(w_ptr + rows[:, None] * D + cols[None, :], mask=row_mask[:, None] & (cols < k_hi)[None, :],
                    other=0, eviction_policy="evict_first")  # weights are read once: leave L2 to x, v, h, y
        xt = tl.load(x_ptr + toks[None, :] * D + cols[:, None], mask=(toks < B)[None, :] & (cols < k_hi)[:, None],
                     other=0.0)
        if NORM:
            xf = xt.to(tl.float32)
            squares += xf * xf
            g = tl.load(g_ptr + cols, mask=cols < k_hi, other=0.0).to(tl.float32)
            xt = (xf * g[:, None]).to(xt.dtype)
        acc = dot(as_operand(w, xt.dtype, DOT_F32), xt, acc, DOT_F32)
    return acc, tl.sum(squares, axis=0)


@triton.jit
def rsqrt_mean(squares, D, eps):
    """1 / RMS of x from its sum of squares over D columns (RMSNorm's factor)."""
    return tl.rsqrt(squares / D + eps)


@triton.jit
def _x_step(x_ptr, g_ptr, cols, k_hi, NORM: tl.constexpr, EVEN: tl.constexpr):
    """One step's x in fp32, and x * g (NORM; else x again); columns from k_hi on read as 0 unless
    EVEN (no column past k_hi)."""
    if EVEN:
        x = tl.load(x_ptr + cols).to(tl.float32)
    else:
        x = tl.load(x_ptr + cols, mask=cols < k_hi, other=0.0).to(tl.float32)
    xg = x
    if NORM:
        if EVEN:
            g = tl.load(g_ptr + cols)
        else:
            g = tl.load(g_ptr + cols, mask=cols < k_hi, other=0.0)
        xg = x * g.to(tl.float32)
    return x, xg


@triton.jit
def rows_times_x1(w_ptr, x_ptr, rows, row_mask, D, k_lo, k_hi, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                  EVEN: tl.constexpr, MAGIC: tl.constexpr, g_ptr, NORM: tl.constexpr, SUB: tl.constexpr):
    """([BLOCK_F] fp32 = w[rows, k_lo:k_hi] @ x[0, k_lo:k_hi], the sum of x^2 over those columns
    (NORM; else 0)) for one token, on the FMA units (NORM: x * g in place of x). The
    products are summed across columns once, after the loop (a [BLOCK_F, BLOCK_D] accumulator),
    not every step. EVEN: k_hi - k_lo is a multiple of BLOCK_D, so the loads need no column mask
    (a mask whose value changes along a row can split the int8 loads into single bytes).
    MAGIC (as_f32): EXACT_INT8 int8 weights converted by int8_to_f32; OFFSET_INT8 by
    int8_to_f32_offset, OFFSET x taken off each step's run sums (RUNS) or off the sums at the end
    (a full accumulator: one product a column per step). SUB > 0 (and dividing BLOCK_D; else ignored):
    each step's products are first summed over runs of SUB adjacent columns (one thread's vector
    load, so no shuffles), and the accumulator is [BLOCK_F, BLOCK_D // SUB]: fewer registers a
    program, more programs an SM."""
    RUNS: tl.constexpr = SUB > 0 and BLOCK_D % max(SUB, 1) == 0
    if RUNS:
        acc = tl.zeros([BLOCK_F, BLOCK_D // SUB], tl.float32)
    else:
        acc = tl.zeros([BLOCK_F, BLOCK_D], tl.float32)
    squares = tl.zeros([BLOCK_D], tl.float32)
    x_sums = tl.zeros([BLOCK_D], tl.float32)  # MAGIC without RUNS: each column's x, summed over the steps
    for k in range(k_lo, k_hi, BLOCK_D):
        cols = k + tl.arange(0, BLOCK_D)
        if EVEN:
            w = tl.load(w_ptr + rows[:, None] * D + cols[None, :], mask=row_mask[:, None], other=0,
                        eviction_policy="evict_first")
        else:
            w = tl.load(w_ptr + rows[:, None] * D + cols[None, :], mask=row_mask[:, None] & (cols < k_hi)[None, :],
                        other=0, eviction_policy="evict_first")
        x, xv = _x_step(x_ptr, g_ptr, cols, k_hi, NORM, EVEN)
        if NORM:
            squares += x * x
        products = as_f32(w, MAGIC) * xv[None, :]
        if RUNS:
            run_sums = tl.sum(tl.reshape(products, [BLOCK_F, BLOCK_D // SUB, SUB]), axis=2)
            if MAGIC == OFFSET_INT8:  # the offset's share, once a run: OFFSET x (the run's sum of x)
                run_sums -= OFFSET * tl.sum(tl.reshape(xv, [BLOCK_D // SUB, SUB]), axis=1)[None, :]
            acc += run_sums
        else:
            acc += products
            if MAGIC == OFFSET_INT8:
                x_sums += xv
    if MAGIC == OFFSET_INT8 and not RUNS:
        acc -= OFFSET * x_sums[None, :]
    return tl.sum(acc, axis=1), tl.sum(squares, axis=0)
