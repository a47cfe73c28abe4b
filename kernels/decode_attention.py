"""Flash-decoding attention for one new token over a static KV cache, as the custom op
catsgen::decode_attention (Triton on CUDA, the torch reference elsewhere).

Contract: q [B, H, 1, D], k_cache / v_cache [B, Hkv, S, D] (H a multiple of Hkv: GQA), pos int64
[1] on the device (the current token's index; its key and value are already in the cache). Key j
is attended iff j <= pos and, with a sliding window w, pos - j < w. Returns [B, H, 1, D] in q.dtype.

Only the allowed positions are read (SDPA with a boolean mask reads all S). pos stays on the
device (no host sync, static shapes), so the grid covers any position and programs with nothing
to do exit before loading anything.

One launch, _split_kernel, grid (n_splits, B * n_kv_heads): the allowed range [lo, pos] (lo =
pos - window + 1 with a sliding window, else 0) is cut on the device into n_splits equal parts
(rounded up to GRANULE positions); program (c, b*kv) takes part c. n_splits is fixed on the host
so that the grid holds about `programs` programs whatever the context. A program handles all
G = n_heads / n_kv_heads query heads of its kv head, so K and V are read once (GQA without
repeats), and writes an unnormalised fp32 partial output and its running max / sum of exp
(base 2) per query head. Then it arrives on its (b, kv head)'s counter; the last part to
arrive combines the partials of all parts, writes the output in q.dtype, and sets the counter
back to zero (a workspace kept across calls, see arrival_counters). When the range is a single
part (short context), its program writes the output itself. Why this design, with
measurements: notes/kernels.md.

decode_attention_rope takes the W_qkv output of the new token instead of q and a filled cache:
the same launch applies RoPE to q (each program, for its heads) and to the new key; the part
holding position pos writes the new key and value into the cache and takes them from registers
for that position, so q/k/v make one trip (no RoPE or cache-write kernels between W_qkv and
attention).

Over 300 lines on purpose: both entry points (decode_attention, decode_attention_rope) are the same
_split_kernel (ROPE a constexpr), with their references and ops; split apart, the kernel and its
launch would live in one file and half their callers in another.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .workspace import int32_workspace

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (e.g. macOS): the op still runs, through the reference
    triton = None

__all__ = ["decode_attention", "decode_attention_reference", "decode_attention_triton", "Blocks",
           "arrival_counters", "decode_attention_rope", "decode_attention_rope_reference", "rope_reference"]


def decode_attention_reference(q, k_cache, v_cache, pos, sliding_window: int | None = None):
    """SDPA over the whole cache with the decode mask, in fp32; GQA by repeat_interleave.

    q [B, H, 1, D], k_cache / v_cache [B, Hkv, S, D], pos int64 [1] (index of the current
    token, whose k/v are already in the cache). Key j is attended iff j <= pos and, with a
    sliding window w (None or 0: none), pos - j < w. Returns [B, H, 1, D] in q.dtype."""
    B, H, T, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    delta = pos.reshape(-1)[:1, None].to(torch.long) - torch.arange(S, device=q.device)[None, :]
    allowed = delta >= 0
    if sliding_window:
        allowed = allowed & (delta < sliding_window)
    k, v = k_cache.float(), v_cache.float()
    if H != Hkv:
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q.float(), k, v, attn_mask=allowed[None, None])
    return out.to(q.dtype)


def rope_reference(x, cos, sin):
    """HF's rotate-half RoPE, computed in fp32, returned in x.dtype. x [..., T, D], cos/sin [T, D]."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def split_heads(qkv, n_heads: int, n_kv_heads: int, cos, sin):
    """qkv [B, T, (H + 2 Hkv) * D] -> q [B, H, T, D], k, v [B, Hkv, T, D], RoPE applied to q and k
    (in one call over both)."""
    B, T, _ = qkv.shape
    heads = qkv.view(B, T, n_heads + 2 * n_kv_heads, -1).transpose(1, 2)
    qk, v = heads.split([n_heads + n_kv_heads, n_kv_heads], dim=1)
    q, k = rope_reference(qk, cos, sin).split([n_heads, n_kv_heads], dim=1)
    return q, k, v


def decode_attention_rope_reference(qkv, cos, sin, kv, pos, n_heads: int, sliding_window: int | None = None):
    """The fused contract in torch: qkv [B, 1, (H + 2 Hkv) * D] (one new token), cos/sin [L, D]
    fp32 the RoPE tables (L > pos: row pos is used), kv [2, B, Hkv, S, D] the cache, pos int64 [1].
    Writes the rotated key and the value at pos into kv, then attends as decode_attention_reference.
    Returns [B, H, 1, D]."""
    q, k, v = split_heads(qkv, n_heads, kv.shape[2], cos[pos], sin[pos])
    kv.index_copy_(3, pos, torch.stack((k, v)))
    return decode_attention_reference(q, kv[0], kv[1], pos, sliding_window)


@dataclass(frozen=True)
class Blocks:
    """programs: about how many split programs to launch (n_splits = programs / (B * n_kv_heads));
    granule: a part's length is a multiple of it; min_part: and at least this (at short context
    fewer, longer parts are faster);
    block_n: positions per loop step;
    block_c: partials x query heads combined per step by the last part to finish;
    dot_one_head: tensor-core dots even with one query head per kv head (q padded to 16 rows)."""
    programs: int = 256
    granule: int = 16
    min_part: int = 64
    block_n: int = 64
    warps: int = 4
    stages: int = 1
    block_c: int = 32
    dot_one_head: bool = True


DEFAULT_BLOCKS = Blocks()


if triton is not None:
    @triton.jit
    def _split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, m_ptr, l_ptr, arrivals_ptr, out_ptr,
                      sq_b, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h,
                      H_KV, S, window, n_splits, scale_log2,
                      cos_ptr, sin_ptr, new_k_offset,
                      D: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, GR: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_N: tl.constexpr, GRANULE: tl.constexpr, MIN_PART: tl.constexpr, BLOCK_C: tl.constexpr,
                      USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr, ROPE: tl.constexpr):
        c = tl.program_id(0)
        bkv = tl.program_id(1)
        b = bkv // H_KV
        kvh = bkv % H_KV
        pos, lo, hi, part = _allowed_parts(pos_ptr, S, window, n_splits, GRANULE, MIN_PART)
        start = lo + c * part
        end = tl.minimum(start + part, hi)
        if end > start:  # else: nothing to read, nothing to write
            g = tl.arange(0, GP)
            d = tl.arange(0, BLOCK_D)
            g_ok = g < G
            d_ok = d < D
            heads = kvh * G + g
            q_rows = q_ptr + b.to(tl.int64) * sq_b + heads[:, None] * sq_h
            k_base = k_ptr + b.to(tl.int64) * sk_b + kvh.to(tl.int64) * sk_h
            v_base = v_ptr + b.to(tl.int64) * sv_b + kvh.to(tl.int64) * sv_h
            if ROPE:  # q_ptr is the W_qkv output: rotate q here; new_k_offset: its k, then v, of head 0
                # Row pos of the RoPE tables, read here: indexed outside, the compiled step made a
                # copy of the row for each layer's launch (16 kernels a token, session 7).
                row = tl.minimum(pos, S - 1).to(tl.int64) * D  # the tables cover the cache's S positions
                cos = tl.load(cos_ptr + row + d, mask=d_ok, other=0.0)
                sin = tl.load(sin_ptr + row + d, mask=d_ok, other=0.0)
                q = _rotated(q_rows, d[None, :], g_ok[:, None] & d_ok[None, :], cos[None, :], sin[None, :], D)
                q = q.to(q_ptr.dtype.element_ty)
                new_k = q_ptr + b.to(tl.int64) * sq_b + new_k_offset + kvh * D
                k_new = _rotated(new_k, d, d_ok, cos, sin, D).to(k_ptr.dtype.element_ty)
                v_new = tl.load(new_k + H_KV * D + d, mask=d_ok, other=0.0).to(v_ptr.dtype.element_ty)
            else:
                q = tl.load(q_rows + d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
            m = tl.full([GP], -1.0e30, tl.float32)  # finite: a fully masked step gives p = 0, not NaN
            l = tl.zeros([GP], tl.float32)
            acc = tl.zeros([GP, BLOCK_D], tl.float32)
            n0 = tl.arange(0, BLOCK_N)
            for s0 in tl.range(start, end, BLOCK_N):
                n = s0 + n0
                n_ok = n < end
                kv_mask = n_ok[:, None] & d_ok[None, :]
                # Both loads issued before any arithmetic: one memory round trip per step.
                k = tl.load(k_base + n[:, None].to(tl.int64) * sk_s + d[None, :], mask=kv_mask, other=0.0,
                            eviction_policy="evict_first")
                v = tl.load(v_base + n[:, None].to(tl.int64) * sv_s + d[None, :], mask=kv_mask, other=0.0,
                            eviction_policy="evict_first")
                if ROPE:  # the new key and value from registers in place of the cache row at pos
                    k = tl.where(n[:, None] == pos, k_new[None, :], k)
                    v = tl.where(n[:, None] == pos, v_new[None, :], v)
                if DOT_F32:  # the interpreter's tl.dot misreads bf16 operands (triton 3.9)
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                if USE_DOT:
                    s = tl.dot(q.to(k.dtype), tl.trans(k), input_precision=DOT_PRECISION)
                else:
                    s = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
                s = tl.where(n_ok[None, :], s * scale_log2, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, axis=1))
                alpha = tl.exp2(m - m_new)
                p = tl.exp2(s - m_new[:, None])
                l = l * alpha + tl.sum(p, axis=1)
                if USE_DOT:
                    pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
                else:
                    pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
                acc = acc * alpha[:, None] + pv
                m = m_new
            if ROPE:
                if end == hi and pos < S:  # the part holding pos writes the new key and value
                    # (pos >= S: a caller's error; never write past the cache)
                    tl.store(k_base + pos.to(tl.int64) * sk_s + d, k_new, mask=d_ok)
                    tl.store(v_base + pos.to(tl.int64) * sv_s + d, v_new, mask=d_ok)
            n_parts = tl.cdiv(hi - lo, part)  # the programs that write a partial: c in [0, n_parts)
            if n_parts == 1:  # the whole range was this program's: no partial, no arrival, no combine
                out = acc / tl.where(g_ok, l, 1.0)[:, None]
                tl.store(out_ptr + b.to(tl.int64) * so_b + heads[:, None].to(tl.int64) * so_h + d[None, :],
                         out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
            else:
                partial = (b * H_KV * G + heads).to(tl.int64) * n_splits + c  # [B, H, n_splits] index
                tl.store(o_ptr + partial[:, None] * BLOCK_D + d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])
                tl.store(m_ptr + partial, m, mask=g_ok)
                tl.store(l_ptr + partial, l, mask=g_ok)
                tl.debug_barrier()  # every thread's partial is stored before the arrival is announced
                if tl.atomic_add(arrivals_ptr + bkv, 1, sem="acq_rel") == n_parts - 1:
                    tl.store(arrivals_ptr + bkv, 0)  # for the next call (the next layer's launch)
                    _combine_parts(o_ptr, m_ptr, l_ptr, out_ptr, so_b, so_h, b, kvh, H_KV * G, n_splits, n_parts,
                                   D, G, GR, BLOCK_C, BLOCK_D)

    @triton.jit
    def _allowed_parts(pos_ptr, S, window, n_splits, GRANULE: tl.constexpr, MIN_PART: tl.constexpr):
        """pos, the allowed key range [lo, hi) and the length of its parts (at most n_splits of them)."""
        pos = tl.load(pos_ptr)
        hi = tl.minimum(pos + 1, S)
        lo = tl.where(window > 0, tl.maximum(pos - window + 1, 0), 0)
        part = tl.maximum(tl.cdiv(tl.cdiv(hi - lo, n_splits), GRANULE) * GRANULE, MIN_PART)
        return pos, lo, hi, part

    @triton.jit
    def _rotated(rows, d, mask, cos, sin, D: tl.constexpr):
        """rope_reference on the head vectors at rows + d (d < D): x * cos + rotate_half(x) * sin in fp32."""
        x = tl.load(rows + d, mask=mask, other=0.0).to(tl.float32)
        partner = tl.load(rows + (d + D // 2) % D, mask=mask, other=0.0).to(tl.float32)
        return x * cos + tl.where(d < D // 2, -partner, partner) * sin

    @triton.jit
    def _combine_parts(o_ptr, m_ptr, l_ptr, out_ptr, so_b, so_h, b, kvh, H, n_splits, n_parts,
                       D: tl.constexpr, G: tl.constexpr, GR: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_D: tl.constexpr):
        """out for the G query heads of kv head kvh: the parts' partials rescaled to a common max
        and summed. Loads bypass L1 (.cg): the other parts' partials were written by other SMs."""
        g = tl.arange(0, GR)
        g_ok = g < G
        heads = kvh * G + g
        base = (b * H + heads).to(tl.int64) * n_splits  # [GR]: partial index of part 0
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        cs0 = tl.arange(0, BLOCK_C)
        m = tl.full([GR], -1.0e30, tl.float32)
        l = tl.zeros([GR], tl.float32)
        acc = tl.zeros([GR, BLOCK_D], tl.float32)
        for c0 in tl.range(0, n_parts, BLOCK_C):
            idx = base[:, None] + (c0 + cs0)[None, :]  # [GR, BLOCK_C]
            ok = g_ok[:, None] & ((c0 + cs0) < n_parts)[None, :]
            mc = tl.load(m_ptr + idx, mask=ok, other=float("-inf"), cache_modifier=".cg")
            lc = tl.load(l_ptr + idx, mask=ok, other=0.0, cache_modifier=".cg")
            oc = tl.load(o_ptr + idx[:, :, None] * BLOCK_D + d[None, None, :], mask=ok[:, :, None] & d_ok[None, None, :],
                         other=0.0, cache_modifier=".cg")
            m_new = tl.maximum(m, tl.max(mc, axis=1))
            alpha = tl.exp2(m - m_new)
            w = tl.exp2(mc - m_new[:, None])
            l = l * alpha + tl.sum(w * lc, axis=1)
            acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * oc, axis=1)
            m = m_new
        out = acc / tl.where(g_ok, l, 1.0)[:, None]
        tl.store(out_ptr + b.to(tl.int64) * so_b + heads[:, None].to(tl.int64) * so_h + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


def arrival_counters(device, n: int) -> torch.Tensor:
    """int32 [>= n]: per (sequence, kv head), how many parts of this call have finished; a
    workspace (see workspace.py) that the last part sets back to zero. prepare_workspaces makes
    it, before any CUDA-graph capture."""
    return int32_workspace("decode_attention_arrivals", device, max(n, 256))


def decode_attention_triton(q, k_cache, v_cache, pos, sliding_window: int | None = None,
                            blocks: Blocks = DEFAULT_BLOCKS):
    """The Triton path (same contract as decode_attention_reference). On CPU tensors it needs
    TRITON_INTERPRET=1 set before this module was imported."""
    B, H, T, D = q.shape
    assert T == 1, "decode attention takes one query token"
    assert v_cache.shape == k_cache.shape and k_cache.shape[3] == D and H % k_cache.shape[1] == 0
    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache))
    return _launch(q, (q.stride(0), q.stride(1)), H, k_cache, v_cache, pos, sliding_window, blocks)


def decode_attention_rope_triton(qkv, cos, sin, kv, pos, n_heads: int, sliding_window: int | None = None,
                                 blocks: Blocks = DEFAULT_BLOCKS):
    """The Triton path of decode_attention_rope (contract: decode_attention_rope_reference)."""
    B, T, width = qkv.shape
    _, _, Hkv, S, D = kv.shape
    assert T == 1 and width == (n_heads + 2 * Hkv) * D and n_heads % Hkv == 0
    assert cos.shape == sin.shape and cos.dim() == 2 and cos.shape[1] == D and cos.dtype == sin.dtype == torch.float32
    assert kv.stride(-1) == 1 and cos.shape[0] >= S, "RoPE tables cover every cache position"
    qkv, cos, sin = (t.contiguous() for t in (qkv, cos, sin))
    return _launch(qkv, (qkv.stride(0), D), n_heads, kv[0], kv[1], pos, sliding_window, blocks,
                   rope=(cos, sin, n_heads * D))


def _launch(q, q_strides, H, k_cache, v_cache, pos, sliding_window, blocks, rope=None):
    """One _split_kernel launch; q_strides: (sequence, head) strides of q's [B, H, D] elements."""
    B, D = q.shape[0], k_cache.shape[3]
    _, Hkv, S, _ = k_cache.shape
    G = H // Hkv
    block_d = max(16, triton.next_power_of_2(D))
    use_dot = G > 1 or blocks.dot_one_head
    gp = max(16, triton.next_power_of_2(G)) if use_dot else 1  # tl.dot needs M >= 16
    n_splits = max(1, min(triton.cdiv(blocks.programs, B * Hkv), triton.cdiv(S, blocks.granule)))
    window = int(sliding_window or 0)
    dev = q.device
    o_part = torch.empty(B * H * n_splits * block_d, device=dev, dtype=torch.float32)
    m_part = torch.empty(B * H * n_splits, device=dev, dtype=torch.float32)
    l_part = torch.empty(B * H * n_splits, device=dev, dtype=torch.float32)
    out = torch.empty((B, H, 1, D), device=dev, dtype=q.dtype)
    dot_f32 = use_dot and not q.is_cuda and q.dtype == torch.bfloat16  # interpreter only, see the kernel
    precision = "ieee" if q.dtype == torch.float32 or dot_f32 else "tf32"  # unused for 16-bit inputs
    gr = triton.next_power_of_2(G)
    cos, sin, new_k_offset = rope if rope is not None else (q, q, 0)  # unused without RoPE
    _split_kernel[(n_splits, B * Hkv)](
        q, k_cache, v_cache, pos, o_part, m_part, l_part, arrival_counters(dev, B * Hkv), out,
        q_strides[0], q_strides[1], k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        Hkv, S, window, n_splits, math.log2(math.e) / math.sqrt(D), cos, sin, new_k_offset,
        D=D, G=G, GP=gp, GR=gr, BLOCK_D=block_d, BLOCK_N=blocks.block_n, GRANULE=blocks.granule,
        MIN_PART=blocks.min_part, BLOCK_C=max(1, blocks.block_c // gr), USE_DOT=use_dot, DOT_PRECISION=precision,
        DOT_F32=dot_f32, ROPE=rope is not None, num_warps=blocks.warps, num_stages=blocks.stages)
    return out


@torch.library.custom_op("catsgen::decode_attention", mutates_args=())
def _decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         pos: torch.Tensor, sliding_window: int) -> torch.Tensor:
    if q.is_cuda:
        return decode_attention_triton(q, k_cache, v_cache, pos, sliding_window)
    return decode_attention_reference(q, k_cache, v_cache, pos, sliding_window)


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, pos, sliding_window):
    return q.new_empty(q.shape[0], q.shape[1], 1, q.shape[3])


@torch.library.custom_op("catsgen::decode_attention_rope", mutates_args=("kv",))
def _decode_attention_rope_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: torch.Tensor,
                              pos: torch.Tensor, n_heads: int, sliding_window: int) -> torch.Tensor:
    if qkv.is_cuda:
        return decode_attention_rope_triton(qkv, cos, sin, kv, pos, n_heads, sliding_window)
    return decode_attention_rope_reference(qkv, cos, sin, kv, pos, n_heads, sliding_window)


@_decode_attention_rope_op.register_fake
def _(qkv, cos, sin, kv, pos, n_heads, sliding_window):
    return qkv.new_empty(qkv.shape[0], n_heads, 1, kv.shape[-1])


def decode_attention_rope(qkv, cos, sin, kv, pos, n_heads: int, sliding_window: int | None = None,
                          use_triton: bool | None = None):
    """decode_attention for the new token's W_qkv output qkv [B, 1, (H + 2 Hkv) * D]: RoPE (row pos
    of the fp32 tables cos, sin [L, D]) on q and k, the new key and value written into the cache kv [2, B, Hkv, S, D]
    at pos, then attention over the allowed keys; all in one launch on the Triton path.
    Returns [B, H, 1, D]. use_triton as in decode_attention."""
    if use_triton:
        return decode_attention_rope_triton(qkv, cos, sin, kv, pos, n_heads, sliding_window)
    if use_triton is False:
        return decode_attention_rope_reference(qkv, cos, sin, kv, pos, n_heads, sliding_window)
    return torch.ops.catsgen.decode_attention_rope(qkv, cos, sin, kv, pos, n_heads, int(sliding_window or 0))


def decode_attention(q, k_cache, v_cache, pos, sliding_window: int | None = None,
                     use_triton: bool | None = None):
    """Attention of one new token q [B, H, 1, D] over the static cache [B, Hkv, S, D], keys
    0..pos (and pos - j < sliding_window when given); GQA when H is a multiple of Hkv.
    Returns [B, H, 1, D] in q.dtype.

    use_triton: None (default) runs the custom op: Triton on CUDA, the reference elsewhere.
    True forces the Triton path (CPU tensors need TRITON_INTERPRET=1 set before triton kernels
    are defined); False forces the reference."""
    if use_triton:
        return decode_attention_triton(q, k_cache, v_cache, pos, sliding_window)
    if use_triton is False:
        return decode_attention_reference(q, k_cache, v_cache, pos, sliding_window)
    return torch.ops.catsgen.decode_attention(q, k_cache, v_cache, pos, int(sliding_window or 0))
