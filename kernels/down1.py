"""A part of kernels/cats_mlp.py (which imports it only where Triton imports, as it does tiles.py):
the CATS MLP's down launch for one token (B = 1) on the FMA units, as a program of STEPS x BLOCK_R
consecutive entries of the gate launch's row list and BLOCK_D columns of W_down^T. Two kernels
with one contract: down1_kernel on the weights as stored (float, or int8 bytes), and
down1_words_kernel on int8 weights loaded as int32 words (Blocks.down_words), whose tile can be
carried across the loop's steps without being repacked. Both read the list's length from count[1]
(the up launch's copy) and set count[0] back to 0 for the next call's gate launch."""
import triton
import triton.language as tl

from .to_f32 import OFFSET, OFFSET_INT8, PLAIN, as_f32, int8_words_to_f32_offset


@triton.jit
def _first_entries(idx_ptr, count_ptr, item, F, N_COLS, BLOCK_R: tl.constexpr, STEPS: tl.constexpr):
    """(this program's first BLOCK_R list slots, their rows, the list's length, whether the program
    has work). The rows are loaded alongside the length, not after it (one L2 round trip less
    before the weights' loads); entries past the length are stale, masked by the caller. The first
    program empties the list for the next call's gate launch."""
    slots = (item // N_COLS) * (BLOCK_R * STEPS) + tl.arange(0, BLOCK_R)
    rows = tl.load(idx_ptr + slots, mask=slots < F, other=0)
    n_active = tl.minimum(tl.load(count_ptr + 1), F)
    if item == 0:
        tl.store(count_ptr, 0)
    return slots, rows, n_active, item < tl.cdiv(n_active, BLOCK_R * STEPS) * N_COLS


@triton.jit
def _row_groups(t, BLOCK_R: tl.constexpr, ACC_ROWS: tl.constexpr):
    """t [BLOCK_R] or [BLOCK_R, N] summed over the rows r = a * ACC_ROWS + b for each b: [ACC_ROWS(, N)]."""
    if ACC_ROWS < BLOCK_R:
        return tl.sum(tl.reshape(t, [BLOCK_R // ACC_ROWS, ACC_ROWS] + list(t.shape[1:])), axis=0)
    else:
        return t


@triton.jit
def down1_kernel(v_ptr, u_acc_ptr, idx_ptr, count_ptr, wd_ptr, sd_ptr, y_acc_ptr, D, F, N_COLS, r_ptr,
                 BLOCK_R: tl.constexpr, STEPS: tl.constexpr, BLOCK_D: tl.constexpr, INT8: tl.constexpr,
                 EVEN: tl.constexpr, NORM: tl.constexpr, FOLD: tl.constexpr):
    """The down launch for one token (B = 1) on the FMA units: a program takes STEPS x BLOCK_R
    consecutive list entries and BLOCK_D columns, and sums its rows in a [BLOCK_R, BLOCK_D]
    accumulator: one reduction across rows and one atomic add per program, where a program of
    cats_mlp._down_kernel without a tl.dot would need one per column step. Each step loads the next
    step's list entries before its rows, so a step waits for one memory round trip (its rows),
    not two (the list entries, then the rows they name). FOLD > 0 (dividing BLOCK_R): the
    accumulator is [FOLD, BLOCK_D], each step's rows summed in groups r = a * FOLD + b over a;
    where FOLD is the rows one layout period covers, those sums stay inside a thread."""
    item = tl.program_id(0)
    slots, rows, n_active, working = _first_entries(idx_ptr, count_ptr, item, F, N_COLS, BLOCK_R, STEPS)
    if working:
        cols = (item % N_COLS) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        ACC_ROWS: tl.constexpr = FOLD if FOLD > 0 and BLOCK_R % max(FOLD, 1) == 0 else BLOCK_R
        CONVERT: tl.constexpr = OFFSET_INT8 if INT8 else PLAIN  # int8: OFFSET + q, taken off below
        acc = tl.zeros([ACC_ROWS, BLOCK_D], tl.float32)
        r = 1.0
        if NORM:  # the norm's 1 / rms (written by the gate launch)
            r = tl.load(r_ptr)
        if INT8:  # W_down's output-channel scales, before the loop (not at the program's end)
            s_cols = tl.load(sd_ptr + cols, mask=col_ok, other=0.0)
        ok = slots < n_active
        for step in range(STEPS):
            h = tl.load(v_ptr + rows, mask=ok, other=0.0) * (tl.load(u_acc_ptr + slots, mask=ok, other=0.0) * r)
            w_mask = ok[:, None] if EVEN else ok[:, None] & col_ok[None, :]  # EVEN: no mask along a row
            w = tl.load(wd_ptr + rows[:, None] * D + cols[None, :], mask=w_mask, other=0,
                        eviction_policy="evict_first")
            slots = slots + BLOCK_R  # the next step's entries, loaded while this step's rows arrive
            ok = slots < n_active
            rows = tl.load(idx_ptr + slots, mask=ok, other=0)
            step_sums = _row_groups(as_f32(w, CONVERT) * h[:, None], BLOCK_R, ACC_ROWS)
            if INT8:  # int8_to_f32_offset's offset: OFFSET times the sum of h over each row group
                step_sums -= OFFSET * _row_groups(h, BLOCK_R, ACC_ROWS)[:, None]
            acc += step_sums
        y = tl.sum(acc, axis=0)
        if INT8:
            y = y * s_cols
        tl.atomic_add(y_acc_ptr + cols, y, mask=col_ok, sem="relaxed")


@triton.jit
def _h_and_words(v_ptr, u_acc_ptr, tile, rows, slots, ok, r, D):
    """A step's (v u / rms) [BLOCK_R] and its rows of W_down^T as int32 words."""
    h = tl.load(v_ptr + rows, mask=ok, other=0.0) * (tl.load(u_acc_ptr + slots, mask=ok, other=0.0) * r)
    return h, tl.load(tile + rows[:, None] * (D // 4), mask=ok[:, None], other=0, eviction_policy="evict_first")


@triton.jit
def down1_words_kernel(v_ptr, u_acc_ptr, idx_ptr, count_ptr, wd_ptr, sd_ptr, y_acc_ptr, D, F, N_COLS, r_ptr,
                        BLOCK_R: tl.constexpr, STEPS: tl.constexpr, BLOCK_D: tl.constexpr, NORM: tl.constexpr,
                        FOLD: tl.constexpr):
    """down1_kernel for int8 W_down^T loaded as int32 words (Blocks.down_words; whole columns):
    four accumulators, one a byte position of the words, joined into columns at the end. Each
    step's rows and h are loaded a step early (the list's entries two steps early), so the next
    step's bytes are in flight while this step's are multiplied (a byte tile carried so was
    repacked every step: notes/kernels.md v11)."""
    item = tl.program_id(0)
    slots, rows, n_active, working = _first_entries(idx_ptr, count_ptr, item, F, N_COLS, BLOCK_R, STEPS)
    if working:
        WORDS: tl.constexpr = BLOCK_D // 4
        ACC_ROWS: tl.constexpr = FOLD if FOLD > 0 and BLOCK_R % max(FOLD, 1) == 0 else BLOCK_R
        cols = (item % N_COLS) * BLOCK_D + tl.arange(0, BLOCK_D)
        tile = wd_ptr.to(tl.pointer_type(tl.int32)) + (item % N_COLS) * WORDS + tl.arange(0, WORDS)[None, :]
        r = 1.0
        if NORM:  # the norm's 1 / rms (written by the gate launch)
            r = tl.load(r_ptr)
        s_cols = tl.load(sd_ptr + cols)  # W_down's output-channel scales, before the loop
        acc0 = tl.zeros([ACC_ROWS, WORDS], tl.float32)
        acc1, acc2, acc3 = acc0, acc0, acc0
        ok = slots < n_active
        h, w = _h_and_words(v_ptr, u_acc_ptr, tile, rows, slots, ok, r, D)  # the first step's, then
        slots += BLOCK_R  # the second step's list entries
        ok = slots < n_active
        rows = tl.load(idx_ptr + slots, mask=ok, other=0)
        for step in range(STEPS):
            h_ahead, w_ahead = _h_and_words(v_ptr, u_acc_ptr, tile, rows, slots, ok, r, D)
            slots += BLOCK_R  # the list entries of the step after next
            ok = slots < n_active
            rows = tl.load(idx_ptr + slots, mask=ok, other=0)
            b0, b1, b2, b3 = int8_words_to_f32_offset(w)
            offset = OFFSET * _row_groups(h, BLOCK_R, ACC_ROWS)[:, None]  # the conversion's, per row group
            acc0 += _row_groups(b0 * h[:, None], BLOCK_R, ACC_ROWS) - offset
            acc1 += _row_groups(b1 * h[:, None], BLOCK_R, ACC_ROWS) - offset
            acc2 += _row_groups(b2 * h[:, None], BLOCK_R, ACC_ROWS) - offset
            acc3 += _row_groups(b3 * h[:, None], BLOCK_R, ACC_ROWS) - offset
            h, w = h_ahead, w_ahead
        # column 4j + 2a + b is [j, a, b] of the joined sums (byte position 2a + b of word j)
        y02 = tl.join(tl.sum(acc0, axis=0), tl.sum(acc2, axis=0))
        y13 = tl.join(tl.sum(acc1, axis=0), tl.sum(acc3, axis=0))
        y = tl.reshape(tl.join(y02, y13), [BLOCK_D])
        tl.atomic_add(y_acc_ptr + cols, y * s_cols, sem="relaxed")
