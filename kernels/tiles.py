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

from .to_f32 import OFFSET, OFFSET_INT8, as_f32, int8_words_to_f32_offset


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
                  EVEN: tl.constexpr, MAGIC: tl.constexpr, g_ptr, NORM: tl.constexpr, SUB: tl.constexpr,
                  WORDS: tl.constexpr = 0, LANES: tl.constexpr = 0):
    """_rows_times_x1_bytes, or for int8 weights with WORDS > 0 rows_times_x1_words (the tile as
    int32 words; WORDS 2: a step ahead; LANES: its lanes), whose tiles need EVEN and the offset
    conversion (the callers' word_tiles decides where they fit)."""
    if WORDS > 0:  # (one return: Triton checks every return's type, even in a branch not taken)
        out = rows_times_x1_words(w_ptr, x_ptr, rows, row_mask, D, k_lo, k_hi, BLOCK_F, BLOCK_D, g_ptr, NORM, SUB,
                                  WORDS == 2, LANES)
    else:
        out = _rows_times_x1_bytes(w_ptr, x_ptr, rows, row_mask, D, k_lo, k_hi, BLOCK_F, BLOCK_D, EVEN, MAGIC, g_ptr,
                                   NORM, SUB)
    return out


@triton.jit
def _rows_times_x1_bytes(w_ptr, x_ptr, rows, row_mask, D, k_lo, k_hi, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
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


@triton.jit
def _along(v, AXIS: tl.constexpr):
    """A vector as a column (AXIS 0) or a row (1) of a 2-D tile, to broadcast along the other axis."""
    if AXIS == 0:  # (one return: Triton checks every return's type, even in a branch not taken)
        tile = v[:, None]
    else:
        tile = v[None, :]
    return tile


@triton.jit
def rows_times_x1_words(w_ptr, x_ptr, rows, row_mask, D, k_lo, k_hi, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                        g_ptr, NORM: tl.constexpr, SUB: tl.constexpr, AHEAD: tl.constexpr, LANES: tl.constexpr):
    """rows_times_x1 for int8 weights through int8_words_to_f32_offset, with full columns (EVEN,
    D a multiple of 16) and runs (SUB a multiple of 4 dividing BLOCK_D): the tile is loaded as int32
    words, four weights a word, and the products of a word's four columns summed before the runs.
    AHEAD: each step's words are loaded a step early, so the next step's bytes are in flight while
    this step's are multiplied (two tiles of registers). LANES: one word a lane, not four (32-bit
    loads; runs of one word): the warps then split the columns, and each thread's x is the four
    columns of its own word, where vector loads need x moved between warps through shared memory
    every step (barriers; SASS: scripts/sass_report.py). LANES = 1 loads the tile as [rows, words],
    2 as [words, rows]: with no dimension contiguous, Triton 3.9's coalescing gives the words a lane
    each in the first, Triton 3.6's in the second (8 x 4 threads of rows x words in the other)."""
    WORDS: tl.constexpr = BLOCK_D // 4
    RUN: tl.constexpr = 1 if LANES else SUB // 4  # words a run
    cols_w = tl.arange(0, WORDS)
    if LANES:  # a condition the compiler cannot decide hides the words' contiguity: no vector loads
        cols_w = tl.where(cols_w < D, cols_w, 0)
    ROWS_AXIS: tl.constexpr = 1 if LANES == 2 else 0
    W_AXIS: tl.constexpr = 1 - ROWS_AXIS
    tile = w_ptr.to(tl.pointer_type(tl.int32)) + _along(rows * (D // 4), ROWS_AXIS) + _along(cols_w, W_AXIS)
    tile_ok = _along(row_mask, ROWS_AXIS)
    acc = tl.zeros([WORDS, BLOCK_F] if LANES == 2 else [BLOCK_F, WORDS // RUN], tl.float32)
    squares = tl.zeros([BLOCK_D], tl.float32)
    if AHEAD:
        words = tl.load(tile + k_lo // 4, mask=tile_ok, other=0, eviction_policy="evict_first")
    for k in range(k_lo, k_hi, BLOCK_D):
        if AHEAD:  # the next step's words (none past k_hi), then this step's work on the words in hand
            next_ok = tl.where(k + BLOCK_D < k_hi, tile_ok, False)  # (mask & scalar: the interpreter refuses)
            ahead = tl.load(tile + (k + BLOCK_D) // 4, mask=next_ok, other=0, eviction_policy="evict_first")
        else:
            words = tl.load(tile + k // 4, mask=tile_ok, other=0, eviction_policy="evict_first")
        x, xv = _x_step(x_ptr, g_ptr, k + tl.arange(0, BLOCK_D), k_hi, NORM, True)
        if NORM:
            squares += x * x
        x02, x13 = tl.split(tl.reshape(xv, [WORDS, 2, 2]))  # column 4j + 2a + b: [j, a] of x_b
        x0, x2 = tl.split(x02)
        x1, x3 = tl.split(x13)
        b0, b1, b2, b3 = int8_words_to_f32_offset(words)
        if LANES:  # a word's products, the offset's share (OFFSET x, the word's sum of x) taken off first
            products = b0 * _along(x0, W_AXIS) - _along((x0 + x1 + x2 + x3) * OFFSET, W_AXIS)
            products = tl.fma(b1, _along(x1, W_AXIS), products)
            products = tl.fma(b2, _along(x2, W_AXIS), products)
            acc += tl.fma(b3, _along(x3, W_AXIS), products)
        else:
            products = b0 * x0[None, :] + b1 * x1[None, :] + b2 * x2[None, :] + b3 * x3[None, :]
            run_sums = tl.sum(tl.reshape(products, [BLOCK_F, WORDS // RUN, RUN]), axis=2)
            # the offset's share, once a run: OFFSET x (the run's sum of x)
            run_sums -= OFFSET * tl.sum(tl.reshape(x0 + x1 + x2 + x3, [WORDS // RUN, RUN]), axis=1)[None, :]
            acc += run_sums
        if AHEAD:
            words = ahead
    return tl.sum(acc, axis=W_AXIS), tl.sum(squares, axis=0)
