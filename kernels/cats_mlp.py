"""The CATS MLP at decode time (batch B = 1..16): y = W_down (CATS_t(SiLU(W_gate x)) * (W_up x)),
as the custom op catsgen::cats_mlp (Triton on CUDA, the torch reference elsewhere).

Contract: x [B, d]; w_gate, w_up [f, d]; w_down_t [f, d] (W_down transposed: row i = neuron i);
threshold float32, 0-d or [f] (one per neuron); CATS_t(v) = v where |v| > t, else 0. Returns
[B, d] in x.dtype. A neuron no token of the batch needs costs no byte of W_up or W_down.

Weights are read as whole rows. Three Triton launches, no host sync, no memset (the list's
counter is a workspace the launches leave at zero, see list_counter; the op returns the fp32
result, so the cast to x.dtype fuses into the model's residual add):
  1. _gate_kernel: v = CATS_t(SiLU(W_gate x)), dense, BLOCK_F rows per program. Each program
     also appends its active rows (v != 0 for some token) to a list `idx` (one atomic on a
     counter per program), and zeroes the fp32 accumulators of u and y.
  2. _up_kernel:   u[slot] += W_up[idx[slot], cols] x[cols]: a program takes BLOCK_R consecutive
     entries of the list and a range of columns, so every tile it loads is full of needed rows.
  3. _down_kernel: y[cols] += sum over slots of (v u)[slot] W_down^T[idx[slot], cols].
The grid of the sparse launches is sized for "all rows active"; programs past the list's end
return at once. The list's order varies between runs, so fp32 sums may differ in the last bits
(as the atomics of split reductions make them anyway). Tokens are padded to 16 so each step is
one tl.dot on the tensor cores (FMA units for fp32). Why this design and not others, with
measurements: notes/kernels.md.
"""
from dataclasses import dataclass

import torch

from .workspace import int32_workspace

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (e.g. macOS): the op still runs, through the reference
    triton = None

__all__ = ["cats_mlp", "cats_mlp_reference", "cats_mlp_triton", "Blocks", "list_counter"]


def cats_mlp_reference(x, w_gate, w_up, w_down_t, threshold):
    """The definition the Triton kernels must match (same contract as cats_mlp), computed in fp32,
    returned in x.dtype."""
    xf = x.float()
    v = torch.nn.functional.silu(xf @ w_gate.float().t())
    v = torch.where(v.abs() > threshold.float(), v, 0.0)
    h = v * (xf @ w_up.float().t())
    return (h @ w_down_t.float()).to(x.dtype)


if triton is not None:
    @triton.jit
    def _dot(a, b, acc, DOT_F32: tl.constexpr):
        if DOT_F32:  # fp32 inputs; also under Triton's interpreter, whose bf16 tl.dot is wrong (3.9)
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)


    @triton.jit
    def _rows_times_x(w_ptr, x_ptr, rows, row_mask, B, D,
                      BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr):
        """[BLOCK_F, 16] fp32 = w[rows] @ x^T (tokens padded to 16); rows outside row_mask are not read."""
        toks = tl.arange(0, 16)
        acc = tl.zeros([BLOCK_F, 16], tl.float32)
        for k in range(0, D, BLOCK_D):
            cols = k + tl.arange(0, BLOCK_D)
            w = tl.load(w_ptr + rows[:, None] * D + cols[None, :], mask=row_mask[:, None] & (cols < D)[None, :],
                        other=0.0, eviction_policy="evict_first")  # weights are read once: leave L2 to x, v, h, y
            xt = tl.load(x_ptr + toks[None, :] * D + cols[:, None], mask=(toks < B)[None, :] & (cols < D)[:, None],
                         other=0.0)
            acc = _dot(w, xt, acc, DOT_F32)
        return acc


    @triton.jit
    def _gate_kernel(x_ptr, wg_ptr, t_ptr, v_ptr, idx_ptr, count_ptr, u_acc_ptr, y_acc_ptr, B, D, F,
                     T_PER_ROW: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, ZBLOCK: tl.constexpr,
                     DOT_F32: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_F + tl.arange(0, BLOCK_F)
        row_ok = rows < F
        g = _rows_times_x(wg_ptr, x_ptr, rows, row_ok, B, D, BLOCK_F, BLOCK_D, DOT_F32)
        v = g * tl.sigmoid(g)
        if T_PER_ROW:  # per-neuron thresholds (e.g. a weight-aware score |v_i| s_i > t, as t / s_i)
            t = tl.load(t_ptr + rows, mask=row_ok, other=0.0)[:, None]
        else:
            t = tl.load(t_ptr)
        v = tl.where(tl.abs(v) > t, v, 0.0)  # padded tokens and rows: g = 0, so v = 0
        toks = tl.arange(0, 16)
        tl.store(v_ptr + toks[None, :] * F + rows[:, None], v, mask=(toks < B)[None, :] & row_ok[:, None])

        active = (tl.max(tl.abs(v), axis=1) > 0).to(tl.int32)  # a row is read if any token needs it
        pos = tl.atomic_add(count_ptr, tl.sum(active, axis=0)) + tl.cumsum(active, axis=0) - 1
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
    def _up_kernel(x_ptr, wu_ptr, idx_ptr, count_ptr, u_acc_ptr, B, D, F, COLS_PER_PROG, N_COLS,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr):
        item = tl.program_id(0)
        slots, rows, ok, n_active, n_items = _list_entries(idx_ptr, count_ptr, item, F, N_COLS, BLOCK_R)
        if item == 0:
            tl.store(count_ptr + 1, n_active)  # for the down launch, which resets count_ptr[0]
        toks = tl.arange(0, 16)
        if item < n_items:
            acc = tl.zeros([BLOCK_R, 16], tl.float32)
            c0 = (item % N_COLS) * COLS_PER_PROG
            for c in range(c0, c0 + COLS_PER_PROG, BLOCK_D):
                cols = c + tl.arange(0, BLOCK_D)
                w = tl.load(wu_ptr + rows[:, None] * D + cols[None, :], mask=ok[:, None] & (cols < D)[None, :],
                            other=0.0, eviction_policy="evict_first")
                xt = tl.load(x_ptr + toks[None, :] * D + cols[:, None], mask=(toks < B)[None, :] & (cols < D)[:, None],
                             other=0.0)
                acc = _dot(w, xt, acc, DOT_F32)
            tl.atomic_add(u_acc_ptr + toks[None, :] * F + slots[:, None], acc, mask=(toks < B)[None, :] & ok[:, None],
                          sem="relaxed")


    @triton.jit
    def _down_kernel(v_ptr, u_acc_ptr, idx_ptr, count_ptr, wd_ptr, y_acc_ptr, B, D, F, COLS_PER_PROG, N_COLS,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr):
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
            h = (v * u).to(wd_ptr.dtype.element_ty)  # [16, BLOCK_R]; the dot's operands share the weights' dtype
            c0 = (item % N_COLS) * COLS_PER_PROG
            for c in range(c0, c0 + COLS_PER_PROG, BLOCK_D):
                cols = c + tl.arange(0, BLOCK_D)
                col_ok = cols < D
                w = tl.load(wd_ptr + rows[:, None] * D + cols[None, :], mask=ok[:, None] & col_ok[None, :],
                            other=0.0, eviction_policy="evict_first")
                y = _dot(h, w, tl.zeros([16, BLOCK_D], tl.float32), DOT_F32)
                tl.atomic_add(y_acc_ptr + toks[:, None] * D + cols[None, :], y, mask=tok_ok[:, None] & col_ok[None, :],
                              sem="relaxed")


@dataclass(frozen=True)
class Blocks:
    """Tile sizes (rows x columns per step), steps per program, warps, pipeline depth."""
    gate_f: int = 64
    gate_d: int = 128
    gate_warps: int = 4
    gate_stages: int = 4
    up_r: int = 64
    up_d: int = 128
    up_steps: int = 8
    down_r: int = 64
    down_d: int = 128
    down_steps: int = 2
    warps: int = 4
    stages: int = 3


def pick_blocks(B: int) -> Blocks:
    """Tokens are padded to 16, so one table serves every B (how it was tuned: notes/kernels.md)."""
    return Blocks()


_empty = torch.empty  # scratch allocation; tests swap in a NaN-filling version to catch unwritten outputs


def list_counter(device) -> torch.Tensor:
    """int32 [count, n]: the active-row list's length, a workspace (see workspace.py): the gate
    launch counts up from 0, the up launch copies count to n, the down launch reads n and sets
    count back to 0. prepare_workspaces makes it, before any CUDA-graph capture."""
    return int32_workspace("cats_mlp_list", device, 2)


def cats_mlp_triton(x, w_gate, w_up, w_down_t, threshold, blocks: Blocks | None = None,
                    fp32_out: bool = False):
    """The Triton path of cats_mlp (same contract). fp32_out returns the fp32 accumulator, leaving
    the cast to the caller (the compiled model fuses it away). On CPU tensors it needs
    TRITON_INTERPRET=1 set before triton is imported."""
    B, D = x.shape
    F = w_gate.shape[0]
    assert 1 <= B <= 16, "decode kernel: tokens are padded to 16"
    assert w_gate.shape == w_up.shape == w_down_t.shape == (F, D)
    assert w_gate.is_contiguous() and w_up.is_contiguous() and w_down_t.is_contiguous()
    assert threshold.numel() in (1, F) and threshold.dtype == torch.float32
    x = x.contiguous()
    cfg = blocks or pick_blocks(B)
    dot_f32 = x.dtype == torch.float32 or not x.is_cuda
    common = dict(DOT_F32=dot_f32, num_warps=cfg.warps, num_stages=cfg.stages)

    f32 = dict(device=x.device, dtype=torch.float32)
    v, u_acc, y_acc = _empty(B, F, **f32), _empty(B, F, **f32), _empty(B, D, **f32)
    idx = _empty(F, device=x.device, dtype=torch.int32)
    count = list_counter(x.device)

    n_gate = triton.cdiv(F, cfg.gate_f)
    _gate_kernel[(n_gate,)](x, w_gate, threshold, v, idx, count, u_acc, y_acc, B, D, F,
                            T_PER_ROW=threshold.numel() > 1, BLOCK_F=cfg.gate_f, BLOCK_D=cfg.gate_d,
                            ZBLOCK=triton.next_power_of_2(triton.cdiv(B * (F + D), n_gate)),
                            DOT_F32=dot_f32, num_warps=cfg.gate_warps, num_stages=cfg.gate_stages)
    up_cols, down_cols = cfg.up_d * cfg.up_steps, cfg.down_d * cfg.down_steps
    n_up, n_down = triton.cdiv(D, up_cols), triton.cdiv(D, down_cols)  # column ranges
    _up_kernel[(n_up * triton.cdiv(F, cfg.up_r),)](
        x, w_up, idx, count, u_acc, B, D, F, up_cols, n_up, BLOCK_R=cfg.up_r, BLOCK_D=cfg.up_d, **common)
    _down_kernel[(n_down * triton.cdiv(F, cfg.down_r),)](
        v, u_acc, idx, count, w_down_t, y_acc, B, D, F, down_cols, n_down,
        BLOCK_R=cfg.down_r, BLOCK_D=cfg.down_d, **common)
    return y_acc if fp32_out or x.dtype == torch.float32 else y_acc.to(x.dtype)


@torch.library.custom_op("catsgen::cats_mlp", mutates_args=())
def _cats_mlp_op(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
                 threshold: torch.Tensor) -> torch.Tensor:
    # Returns float32: the cast to x.dtype happens outside the op, where torch.compile fuses it
    # into the following residual add instead of launching one more kernel per layer.
    if x.is_cuda:
        return cats_mlp_triton(x, w_gate, w_up, w_down_t, threshold, fp32_out=True)
    return cats_mlp_reference(x, w_gate, w_up, w_down_t, threshold).float()


@_cats_mlp_op.register_fake
def _(x, w_gate, w_up, w_down_t, threshold):
    return torch.empty_like(x, dtype=torch.float32)


def cats_mlp(x, w_gate, w_up, w_down_t, threshold, use_triton: bool | None = None):
    """y [B, d] = W_down (CATS_t(SiLU(W_gate x)) * (W_up x)) in x.dtype (the contract: module docstring).

    use_triton: None (default) runs the custom op: Triton on CUDA, the torch reference elsewhere.
    True forces the Triton path (CPU tensors need TRITON_INTERPRET=1 set before triton is
    imported); False forces the reference.
    """
    if use_triton:
        return cats_mlp_triton(x, w_gate, w_up, w_down_t, threshold)
    if use_triton is False:
        return cats_mlp_reference(x, w_gate, w_up, w_down_t, threshold)
    return torch.ops.catsgen.cats_mlp(x, w_gate, w_up, w_down_t, threshold).to(x.dtype)
