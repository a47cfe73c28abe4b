"""The CATS MLP at decode time (batch B = 1..16): y = W_down (CATS_t(SiLU(W_gate x)) * (W_up x)),
as the custom op catsgen::cats_mlp (Triton on CUDA, the torch reference elsewhere).

Contract: x [B, d]; w_gate, w_up [f, d]; w_down_t [f, d] (W_down transposed: row i = neuron i);
threshold float32, 0-d or [f] (one per neuron); CATS_t(v) = v where |v| > t, else 0. Returns
[B, d] in x.dtype. norm = (weight, eps): x is the residual stream and the MLP takes RMSNorm(x) *
weight (the gate launch sums x^2 as it walks x and keeps 1 / rms per token for the down launch,
the up launch multiplies x by the weight; no norm kernel before the MLP). A neuron no token of
the batch needs costs no byte of W_up or W_down.
int8 weights (catsgen/quantize.py): w_gate, w_up, w_down_t int8 and scales = (s_gate [f], s_up [f],
s_down [d]) fp32: W_gate = w_gate * s_gate[:, None], W_up likewise, W_down^T = w_down_t * s_down.
A skipped neuron skips its scales too (s_gate is read in full, as W_gate is).

Weights are read as whole rows. Three Triton launches, no host sync, no memset (the list's
counter is a workspace the launches leave at zero, see list_counter; the op returns the fp32
result, so the cast to x.dtype fuses into the model's residual add):
  1. _gate_kernel: v = CATS_t(SiLU(W_gate x)), dense, BLOCK_F rows per program. Each program
     also appends its active rows (v != 0 for some token) to a list `idx` (one atomic on a
     counter per program), and zeroes the fp32 accumulators of u and y.
  2. _up_kernel:   u[slot] += W_up[idx[slot], cols] x[cols]: a program takes BLOCK_R consecutive
     entries of the list and a range of columns, so every tile it loads is full of needed rows.
  3. _down_kernel: y[cols] += sum over slots of (v u)[slot] W_down^T[idx[slot], cols]
     (kernels/down1.py for one token on the FMA units, see Blocks.fma_at_b1 in
     kernels/mlp_tiles.py, which holds the tiles and their tables).
The grid of the sparse launches is sized for "all rows active"; programs past the list's end
return at once. The list's order varies between runs, so fp32 sums may differ in the last bits
(as the atomics of split reductions make them anyway). Several tokens are padded to 16 so each
step is one tl.dot on the tensor cores (FMA units for fp32); one token multiplies on the FMA units
unpadded (mlp_tiles.pick_blocks). Why this design and not others, with measurements:
notes/kernels.md. The one-token down launches, a pair with their own prologue, live in
kernels/down1.py, the tiles in kernels/mlp_tiles.py. Just over 300 lines, one op: its three launches
share the row list, its counter and the folded norm's 1 / rms (the gate launch writes them, the up
and down launches read them), so they are not usable apart.
"""
from typing import Optional

import torch

from . import mlp_tiles
from .mlp_tiles import Blocks, down_words_fit
from .workspace import int32_workspace

try:
    import triton
    import triton.language as tl

    from .down1 import down1_kernel, down1_words_kernel
    from .tiles import as_operand, dot, rows_times_x, rows_times_x1, rsqrt_mean
    from .to_f32 import OFFSET_INT8, PLAIN
except ImportError:  # no Triton (e.g. macOS): the op still runs, through the reference
    triton = None

__all__ = ["cats_mlp", "cats_mlp_reference", "cats_mlp_triton", "rms_norm_reference", "Blocks", "list_counter"]


def rms_norm_reference(x, weight, eps: float):
    """RMSNorm as transformers computes it: normalise in fp32, round to x's dtype, scale by weight
    (the model's RMSNorm calls this too: one definition of the norm the kernels fold in)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def cats_mlp_reference(x, w_gate, w_up, w_down_t, threshold, scales=None, norm=None):
    """The definition the Triton kernels must match (same contract as cats_mlp), computed in fp32,
    returned in x.dtype."""
    dtype = x.dtype
    if norm is not None:
        x = rms_norm_reference(x, *norm).to(dtype)
    if scales is not None:  # int8 weights: dequantize (scales per row of w_gate / w_up, per column of w_down_t)
        s_gate, s_up, s_down = (s.float() for s in scales)
        w_gate, w_up, w_down_t = w_gate.float() * s_gate[:, None], w_up.float() * s_up[:, None], \
            w_down_t.float() * s_down[None, :]
    xf = x.float()
    v = torch.nn.functional.silu(xf @ w_gate.float().t())
    v = torch.where(v.abs() > threshold.float(), v, 0.0)
    h = v * (xf @ w_up.float().t())
    return (h @ w_down_t.float()).to(dtype)


if triton is not None:
    @triton.jit
    def _gate_kernel(x_ptr, wg_ptr, sg_ptr, t_ptr, v_ptr, idx_ptr, count_ptr, u_acc_ptr, y_acc_ptr, B, D, F,
                     g_ptr, r_ptr, eps,
                     T_PER_ROW: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, ZBLOCK: tl.constexpr,
                     DOT_F32: tl.constexpr, INT8: tl.constexpr, FMA: tl.constexpr, EVEN: tl.constexpr,
                     NORM: tl.constexpr, SUB: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_F + tl.arange(0, BLOCK_F)
        row_ok = rows < F
        toks = tl.arange(0, 16)
        # the epilogue's loads before the loop, so their round trip is not added to the program's end
        if INT8:  # per-row (= per-neuron) scales
            s_rows = tl.load(sg_ptr + rows, mask=row_ok, other=0.0)
        if T_PER_ROW:  # per-neuron thresholds (e.g. a weight-aware score |v_i| s_i > t, as t / s_i)
            t = tl.load(t_ptr + rows, mask=row_ok, other=0.0)[:, None]
        else:
            t = tl.load(t_ptr)
        if FMA:  # one token: fp32 FMA, no padding to 16 tokens
            CONVERT: tl.constexpr = OFFSET_INT8 if INT8 else PLAIN
            g1, squares1 = rows_times_x1(wg_ptr, x_ptr, rows, row_ok, D, 0, D, BLOCK_F, BLOCK_D, EVEN, CONVERT, g_ptr,
                                         NORM, SUB)
            g = tl.where(toks[None, :] == 0, g1[:, None], 0.0)
            squares = tl.where(toks == 0, squares1, 0.0)
        else:
            g, squares = rows_times_x(wg_ptr, x_ptr, rows, row_ok, B, D, 0, D, BLOCK_F, BLOCK_D, DOT_F32, g_ptr, NORM)
        if INT8:
            g = g * s_rows[:, None]
        if NORM:  # every program walked all of x: each has the tokens' 1 / rms; one keeps it for down
            r = rsqrt_mean(squares, D, eps)
            g = g * r[None, :]
            if pid == 0:
                tl.store(r_ptr + toks, r, mask=toks < B)
        v = g * tl.sigmoid(g)
        v = tl.where(tl.abs(v) > t, v, 0.0)  # padded tokens and rows: g = 0, so v = 0
        tl.store(v_ptr + toks[None, :] * F + rows[:, None], v, mask=(toks < B)[None, :] & row_ok[:, None])

        active = (tl.max(tl.abs(v), axis=1) > 0).to(tl.int32)  # a row is read if any token needs it
        # relaxed: no program reads the list during this launch (the next launch sees it), and an
        # acq_rel atomic would wait for the program's stores first (notes/kernels.md v11)
        pos = tl.atomic_add(count_ptr, tl.sum(active, axis=0), sem="relaxed") + tl.cumsum(active, axis=0) - 1
        tl.store(idx_ptr + pos, rows, mask=(active > 0) & (pos < F))  # pos < F: only if the counter was stale

        z = pid * ZBLOCK + tl.arange(0, ZBLOCK)  # zero u_acc [B*F] then y_acc [B*D], one range each program
        tl.store(u_acc_ptr + z, tl.zeros([ZBLOCK], tl.float32), mask=z < B * F)
        tl.store(y_acc_ptr + (z - B * F), tl.zeros([ZBLOCK], tl.float32), mask=(z >= B * F) & (z < B * F + B * D))


    @triton.jit
    def _list_entries(idx_ptr, count_ptr, item, F, N_COLS, BLOCK_R: tl.constexpr):
        """This work item's BLOCK_R list entries (slots, rows, which are in the list) and the number of
        work items (BLOCK_R entries x one column range) the list holds. The rows are loaded alongside
        the list's length, not after it: one L2 round trip less before the weights' loads."""
        slots = (item // N_COLS) * BLOCK_R + tl.arange(0, BLOCK_R)
        rows = tl.load(idx_ptr + slots, mask=slots < F, other=0)  # past the list: stale, masked below
        n_active = tl.minimum(tl.load(count_ptr), F)  # min: a stale counter must not read past the list
        return slots, rows, slots < n_active, n_active, tl.cdiv(n_active, BLOCK_R) * N_COLS


    @triton.jit
    def _up_kernel(x_ptr, wu_ptr, su_ptr, idx_ptr, count_ptr, u_acc_ptr, B, D, F, COLS_PER_PROG, N_COLS, g_ptr,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, INT8: tl.constexpr,
                   FMA: tl.constexpr, EVEN: tl.constexpr, NORM: tl.constexpr, SUB: tl.constexpr):
        item = tl.program_id(0)
        slots, rows, ok, n_active, n_items = _list_entries(idx_ptr, count_ptr, item, F, N_COLS, BLOCK_R)
        if item == 0:
            tl.store(count_ptr + 1, n_active)  # for the down launch, which resets count_ptr[0]
        toks = tl.arange(0, 16)
        if item < n_items:
            c0 = (item % N_COLS) * COLS_PER_PROG
            c1 = tl.minimum(c0 + COLS_PER_PROG, D)
            if INT8:  # the scales of the listed rows only (a skipped neuron's is not read), before the loop
                s_rows = tl.load(su_ptr + rows, mask=ok, other=0.0)
            if FMA:
                # NORM: x * g here; 1 / rms (this program sees part of x) waits for the down launch
                CONVERT: tl.constexpr = OFFSET_INT8 if INT8 else PLAIN
                acc1, _ = rows_times_x1(wu_ptr, x_ptr, rows, ok, D, c0, c1, BLOCK_R, BLOCK_D, EVEN, CONVERT, g_ptr,
                                        NORM, SUB)
                acc = tl.where(toks[None, :] == 0, acc1[:, None], 0.0)
            else:
                acc, _ = rows_times_x(wu_ptr, x_ptr, rows, ok, B, D, c0, c1, BLOCK_R, BLOCK_D, DOT_F32, g_ptr, NORM)
            if INT8:
                acc = acc * s_rows[:, None]
            tl.atomic_add(u_acc_ptr + toks[None, :] * F + slots[:, None], acc, mask=(toks < B)[None, :] & ok[:, None],
                          sem="relaxed")


    @triton.jit
    def _down_kernel(x_ptr, v_ptr, u_acc_ptr, idx_ptr, count_ptr, wd_ptr, sd_ptr, y_acc_ptr, B, D, F,
                     COLS_PER_PROG, N_COLS, r_ptr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr,
                     INT8: tl.constexpr, NORM: tl.constexpr):
        item = tl.program_id(0)
        slots, rows, ok, n_active, n_items = _list_entries(idx_ptr, count_ptr + 1, item, F, N_COLS, BLOCK_R)
        if item == 0:
            tl.store(count_ptr, 0)  # the list is empty again for the next call's gate launch
        toks = tl.arange(0, 16)
        tok_ok = toks < B
        if item < n_items:
            m = tok_ok[:, None] & ok[None, :]
            v = tl.load(v_ptr + toks[:, None] * F + rows[None, :], mask=m, other=0.0)
            u = tl.load(u_acc_ptr + toks[:, None] * F + slots[None, :], mask=m, other=0.0)
            if NORM:  # u was summed from x * g: the norm's 1 / rms per token, from the gate launch
                u = u * tl.load(r_ptr + toks, mask=tok_ok, other=0.0)[:, None]
            h = (v * u).to(x_ptr.dtype.element_ty)  # [16, BLOCK_R]; the dot's operands: x's dtype
            c0 = (item % N_COLS) * COLS_PER_PROG
            for c in range(c0, c0 + COLS_PER_PROG, BLOCK_D):
                cols = c + tl.arange(0, BLOCK_D)
                col_ok = cols < D
                w = tl.load(wd_ptr + rows[:, None] * D + cols[None, :], mask=ok[:, None] & col_ok[None, :],
                            other=0, eviction_policy="evict_first")  # 0 of any dtype (int8 too)
                y = dot(h, as_operand(w, h.dtype, DOT_F32), tl.zeros([16, BLOCK_D], tl.float32), DOT_F32)
                if INT8:  # W_down's output-channel scales (per column of W_down^T), on this program's row sum
                    y = y * tl.load(sd_ptr + cols, mask=col_ok, other=0.0)[None, :]
                tl.atomic_add(y_acc_ptr + toks[:, None] * D + cols[None, :], y, mask=tok_ok[:, None] & col_ok[None, :],
                              sem="relaxed")


_empty = torch.empty  # scratch allocation; tests swap in a NaN-filling version to catch unwritten outputs


def list_counter(device) -> torch.Tensor:
    """int32 [count, n]: the active-row list's length, a workspace (see workspace.py): the gate
    launch counts up from 0, the up launch copies count to n, the down launch reads n and sets
    count back to 0. prepare_workspaces makes it, before any CUDA-graph capture."""
    return int32_workspace("cats_mlp_list", device, 2)


def cats_mlp_triton(x, w_gate, w_up, w_down_t, threshold, blocks: Blocks | None = None,
                    fp32_out: bool = False, scales=None, norm=None):
    """The Triton path of cats_mlp (same contract). fp32_out returns the fp32 accumulator, leaving
    the cast to the caller (the compiled model fuses it away). On CPU tensors it needs
    TRITON_INTERPRET=1 set before triton is imported."""
    B, D = x.shape
    F = w_gate.shape[0]
    assert 1 <= B <= 16, "decode kernel: tokens are padded to 16"
    assert w_gate.shape == w_up.shape == w_down_t.shape == (F, D)
    assert w_gate.is_contiguous() and w_up.is_contiguous() and w_down_t.is_contiguous()
    assert threshold.numel() in (1, F) and threshold.dtype == torch.float32
    int8 = scales is not None
    if int8:
        assert w_gate.dtype == w_up.dtype == w_down_t.dtype == torch.int8
        assert [(s.shape, s.dtype) for s in scales] == [((F,), torch.float32)] * 2 + [((D,), torch.float32)]
    s_gate, s_up, s_down = scales if int8 else (threshold,) * 3  # unread when not int8
    assert norm is None or norm[0].shape == (D,)
    g, eps = norm if norm is not None else (x, 0.0)  # unread without a norm
    x = x.contiguous()
    cfg = blocks or mlp_tiles.pick_blocks(B, int8)  # (through the module: a sweep may replace pick_blocks)
    dot_f32 = x.dtype == torch.float32 or not x.is_cuda
    fma = cfg.fma_at_b1 and B == 1
    down_words = int8 and fma and down_words_fit(cfg, D)

    f32 = dict(device=x.device, dtype=torch.float32)
    v, u_acc, y_acc = _empty(B, F, **f32), _empty(B, F, **f32), _empty(B, D, **f32)
    idx = _empty(F, device=x.device, dtype=torch.int32)
    # 1 / rms per token (with a norm): written by the gate launch, read by down; else unread
    r = _empty(B, **f32) if norm is not None else v
    count = list_counter(x.device)

    n_gate = triton.cdiv(F, cfg.gate_f)
    _gate_kernel[(n_gate,)](x, w_gate, s_gate, threshold, v, idx, count, u_acc, y_acc, B, D, F, g, r, eps,
                            T_PER_ROW=threshold.numel() > 1, BLOCK_F=cfg.gate_f, BLOCK_D=cfg.gate_d,
                            ZBLOCK=triton.next_power_of_2(triton.cdiv(B * (F + D), n_gate)),
                            DOT_F32=dot_f32, INT8=int8, FMA=fma, EVEN=D % cfg.gate_d == 0, NORM=norm is not None,
                            SUB=cfg.sub, num_warps=cfg.gate_warps, num_stages=cfg.gate_stages,
                            maxnreg=cfg.gate_regs or None)
    up_cols, down_cols = cfg.up_d * cfg.up_steps, cfg.down_d * cfg.down_steps
    n_up, n_down = triton.cdiv(D, up_cols), triton.cdiv(D, down_cols)  # column ranges
    _up_kernel[(n_up * triton.cdiv(F, cfg.up_r),)](
        x, w_up, s_up, idx, count, u_acc, B, D, F, up_cols, n_up, g, BLOCK_R=cfg.up_r, BLOCK_D=cfg.up_d,
        DOT_F32=dot_f32, INT8=int8, FMA=fma, EVEN=D % up_cols == 0, NORM=norm is not None, SUB=cfg.sub,
        num_warps=cfg.warps, num_stages=cfg.stages)
    if fma:  # down_steps counts row steps here: a program covers down_r x down_steps entries, down_d columns
        n_down = triton.cdiv(D, cfg.down_d)
        grid = (n_down * triton.cdiv(F, cfg.down_r * cfg.down_steps),)
        args = (v, u_acc, idx, count, w_down_t, s_down, y_acc, D, F, n_down, r)
        tiles = dict(BLOCK_R=cfg.down_r, STEPS=cfg.down_steps, BLOCK_D=cfg.down_d, NORM=norm is not None,
                     FOLD=cfg.down_fold, num_warps=cfg.down_warps or cfg.warps, num_stages=cfg.stages)
        if down_words:
            down1_words_kernel[grid](*args, **tiles)
        else:
            down1_kernel[grid](*args, INT8=int8, EVEN=D % cfg.down_d == 0, **tiles)
    else:
        _down_kernel[(n_down * triton.cdiv(F, cfg.down_r),)](
            x, v, u_acc, idx, count, w_down_t, s_down, y_acc, B, D, F, down_cols, n_down, r,
            BLOCK_R=cfg.down_r, BLOCK_D=cfg.down_d, DOT_F32=dot_f32, INT8=int8, NORM=norm is not None,
            num_warps=cfg.warps, num_stages=cfg.stages)
    return y_acc if fp32_out or x.dtype == torch.float32 else y_acc.to(x.dtype)


@torch.library.custom_op("catsgen::cats_mlp", mutates_args=())
def _cats_mlp_op(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
                 threshold: torch.Tensor, s_gate: Optional[torch.Tensor] = None,
                 s_up: Optional[torch.Tensor] = None, s_down: Optional[torch.Tensor] = None,
                 norm_weight: Optional[torch.Tensor] = None, eps: float = 0.0) -> torch.Tensor:
    # Returns float32: the cast to x.dtype happens outside the op, where torch.compile fuses it
    # into the following residual add instead of launching one more kernel per layer.
    scales = None if s_gate is None else (s_gate, s_up, s_down)
    norm = None if norm_weight is None else (norm_weight, eps)
    if x.is_cuda:
        return cats_mlp_triton(x, w_gate, w_up, w_down_t, threshold, fp32_out=True, scales=scales, norm=norm)
    return cats_mlp_reference(x, w_gate, w_up, w_down_t, threshold, scales, norm).float()


@_cats_mlp_op.register_fake
def _(x, w_gate, w_up, w_down_t, threshold, s_gate=None, s_up=None, s_down=None, norm_weight=None, eps=0.0):
    return torch.empty_like(x, dtype=torch.float32)


def cats_mlp(x, w_gate, w_up, w_down_t, threshold, use_triton: bool | None = None, scales=None, norm=None):
    """y [B, d] = W_down (CATS_t(SiLU(W_gate x)) * (W_up x)) in x.dtype (the contract: module docstring).
    scales: None for float weights; (s_gate [f], s_up [f], s_down [d]) fp32 for int8 weights.
    norm: None, or (weight, eps) of the RMSNorm applied to x first.

    use_triton: None (default) runs the custom op: Triton on CUDA, the torch reference elsewhere.
    True forces the Triton path (CPU tensors need TRITON_INTERPRET=1 set before triton is
    imported); False forces the reference.
    """
    if use_triton:
        return cats_mlp_triton(x, w_gate, w_up, w_down_t, threshold, scales=scales, norm=norm)
    if use_triton is False:
        return cats_mlp_reference(x, w_gate, w_up, w_down_t, threshold, scales, norm)
    s_gate, s_up, s_down = scales or (None, None, None)
    g, eps = norm or (None, 0.0)
    return torch.ops.catsgen.cats_mlp(x, w_gate, w_up, w_down_t, threshold, s_gate, s_up, s_down, g,
                                      float(eps)).to(x.dtype)
