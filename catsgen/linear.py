"""The one place that decides which kernel runs for a layer's weights: float or int8 weights,
dense or CATS, decode on CUDA (Triton kernels) or prefill / CPU (torch).

A linear weight is a float tensor or an Int8Weight (catsgen/quantize.py); the model holds either
in the same slot (Linear.weight for W_qkv / W_o, MLP.w_gate / w_up / w_down_t) and calls
`linear` and `mlp` here, so model.py never branches on dtype, quantization or device.

  weights  slot            decode on CUDA (<= KERNEL_MAX_TOKENS tokens)    prefill, CPU
  float    W_qkv, W_o      one token: gemv (Triton; W_o: + residual);      F.linear
                           else cuBLAS (F.linear)
  int8     W_qkv, W_o      gemv (Triton)                                   int8_gemv op: cuBLAS on a
                                                                           transient copy / torch
  float    MLP, dense      one token: gated gemv, cuBLAS W_down^T;         torch; CPU decode: W_down^T
                           else cuBLAS (three F.linear)                    rows by embedding_bag
  float    MLP, CATS       cats_mlp (Triton)
  int8     MLP, dense      gated gemv + gemv (W_down in its [d, f] rows)   torch, dequantized
  int8     MLP, CATS       cats_mlp int8 (Triton)                          torch, dequantized
The input of W_qkv and of the MLP is a Normed (the residual stream and the RMSNorm before the
matrix). The CATS MLP folds the norm in for one token (its gate launch sums x^2 as it walks x with
16 rows a program; no norm kernel before the MLP); everywhere else the norm is computed first
(`normalized`): folded into the GEMVs (2 or 4 rows a program) and into the tl.dot paths it cost
more than the norm kernel it saved (notes/kernels.md v7). W_o takes the residual to add: in
its GEMV's epilogue for one token (for bf16 that also drops cuBLAS's split-K reduce); for one
token the float GEMV beats cuBLAS at every Llama-2-7B shape (notes/kernels.md v8). The dense
MLP's W_gate and W_up run as one gated GEMV writing SiLU(g) * u (one launch for both, no SiLU
kernel).
The int8 dense MLP measured 64.5 us per 4096x11008 layer with three int8_gemv, 73.9 us through
the CATS kernel at threshold -inf (notes/kernels.md, int8 section), so an int8 W_down^T also keeps
its [d, f] rows (Int8Weight keep_rows: 1 byte more per W_down entry, in memory, never read twice).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from catsgen.kernels import cats_mlp, gemv, int8_gemv
from catsgen.quantize import Int8Weight

# Decode steps (at most this many tokens) go to the Triton kernels on CUDA; prefill stays in torch.
KERNEL_MAX_TOKENS = 8
# Tests set this to run the Triton kernels on CPU tensors (under TRITON_INTERPRET=1).
FORCE_TRITON = False

Weight = torch.Tensor | Int8Weight


class Normed(NamedTuple):
    """RMSNorm(x) * weight, not computed yet: the input of W_qkv and of the MLP."""
    x: torch.Tensor  # the residual stream
    norm: nn.Module  # the model's RMSNorm (weight, eps)


def normalized(x: torch.Tensor | Normed) -> torch.Tensor:
    """x itself, or a Normed's norm computed (the torch path)."""
    return x.norm(x.x) if isinstance(x, Normed) else x


def _stream_and_norm(x: torch.Tensor | Normed):
    """(the tensor the kernels read, the norm they fold in: (weight, eps) or None)."""
    return (x.x, (x.norm.weight, x.norm.eps)) if isinstance(x, Normed) else (x, None)


def _few_tokens(x: torch.Tensor) -> bool:
    return x.numel() // x.shape[-1] <= KERNEL_MAX_TOKENS


def on_kernels(x: torch.Tensor) -> bool:
    """Whether x's device runs the Triton kernels: CUDA, or (tests) the interpreter on the CPU."""
    return x.is_cuda or FORCE_TRITON


def _decode_kernels(x: torch.Tensor) -> bool:
    return _few_tokens(x) and on_kernels(x)


def cats_keep(v: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Which activations CATS keeps: |v| > t, compared in fp32 whatever the model dtype, as
    calibration measured |v| in fp32."""
    return v.float().abs() > threshold


def use_triton() -> bool | None:
    return True if FORCE_TRITON else None  # None: the custom op (Triton on CUDA, torch elsewhere)


def float_weight(w: Weight, dtype: torch.dtype) -> torch.Tensor:
    """The weight as a float tensor in its stored layout (int8: dequantized, a transient copy)."""
    return w.dequantize(dtype) if isinstance(w, Int8Weight) else w


# Float weights kept column-major on the CPU (the same [out, in] tensor, transposed in memory):
# there a GEMV x @ W^T reads W 1.5-1.9x faster that way (MKL's x @ B over a row-major B [in, out]),
# and prefill's matmuls are as fast either way (notes/cpu.md). W_down^T keeps its rows: CATS
# skips them.
CPU_COLUMN_MAJOR = ("attention.wqkv.weight", "attention.wo.weight", "feed_forward.w_gate", "feed_forward.w_up",
                    "output.weight")


def cpu_layout(name: str, w: torch.Tensor) -> torch.Tensor:
    """Weight `name` in the memory layout its device reads fastest (a copy where that changes)."""
    if w.device.type != "cpu" or not name.endswith(CPU_COLUMN_MAJOR):
        return w
    return w.t().contiguous().t()


# From this sparsity on, a layer's CPU decode under CATS gathers W_up's active rows (row-major W_up)
# instead of reading all of it column-major. 30 layers of 1536x576, 1 thread, loaded machine: a
# gather of a fraction a of the rows plus its GEMV took ~320a us against 171 us for the whole,
# even at a = 0.5; the gather runs on one thread while the whole GEMV may use two, so only the
# clearly sparse layers gather (notes/cpu.md).
UP_GATHER_SPARSITY = 0.6


def cpu_up_layout(w: Weight, gather: bool) -> Weight:
    """W_up laid out for the CPU decode: row-major where it gathers the active neurons' rows
    (_up_rows), column-major for the whole GEMV (cpu_layout). The same values either way; off the
    CPU, and int8, the weight stays as it is."""
    if isinstance(w, Int8Weight) or w.device.type != "cpu":
        return w
    laid_out = w.contiguous() if gather else w.t().contiguous().t()
    return w if laid_out.data_ptr() == w.data_ptr() else nn.Parameter(laid_out, requires_grad=False)


@contextmanager
def one_thread():
    """CPU work too small for a second thread (one token's attention over the prefix, a gather of
    rows): waking that thread saves little, and on a shared machine can cost milliseconds
    (notes/cpu.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _one_token(x: torch.Tensor) -> bool:
    return x.numel() == x.shape[-1]


def linear(x: torch.Tensor | Normed, w: Weight, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ residual) for a weight stored as W [out, in]; x may be a Normed."""
    int8 = isinstance(w, Int8Weight)
    x = normalized(x)
    if _decode_kernels(x) and (int8 or _one_token(x)):
        # .contiguous(): a no-op on CUDA; CPU weights may be column-major (cpu_layout; tests)
        q, scale = (w.q, w.scale) if int8 else (w.contiguous(), None)
        return gemv(x, q, scale, residual=residual, use_triton=use_triton())
    y = F.linear(x, w) if not int8 else int8_gemv(x, w.q, w.scale)
    return y if residual is None else y + residual


def mlp(x: torch.Tensor | Normed, w_gate: Weight, w_up: Weight, w_down_t: Weight, threshold: torch.Tensor | None = None,
        activate: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """y = W_down (act(SiLU(W_gate x)) * (W_up x)), act = CATS at `threshold` (None: dense).
    `activate` replaces act on the torch path (calibration recording, sparsity counting): it
    forces that path, since the kernels can not call it."""
    if activate is None and _decode_kernels(_stream_and_norm(x)[0]):
        y = _mlp_kernel(x, w_gate, w_up, w_down_t, threshold)
        if y is not None:
            return y
    x = normalized(x)
    if activate is None and _cpu_decode(x) and not isinstance(w_down_t, Int8Weight):
        return _mlp_cpu_decode(x, w_gate, w_up, w_down_t, threshold)
    if activate is None:
        activate = (lambda v: v) if threshold is None else (lambda v: torch.where(cats_keep(v, threshold), v, 0))
    h = activate(F.silu(linear(x, w_gate))) * linear(x, w_up)
    return h @ float_weight(w_down_t, x.dtype)


def _cpu_decode(x) -> bool:
    """A few tokens, eager, off CUDA: where a data-dependent row choice (a host sync) is free."""
    return not x.is_cuda and _few_tokens(x) and not torch.compiler.is_compiling()


def _rows_sum(h, w_down_t, rows=None):
    """h @ W_down^T[rows] (h [tokens, len(rows)]; rows None: all) as embedding_bag, a weighted sum
    of the chosen rows read in place: on the CPU it also beats the matmul over all rows
    (notes/cpu.md)."""
    rows = torch.arange(w_down_t.shape[0], device=h.device) if rows is None else rows
    return F.embedding_bag(rows.expand(h.shape[0], -1), w_down_t, per_sample_weights=h, mode="sum")


def _mlp_cpu_decode(x, w_gate, w_up, w_down_t, threshold):
    """Decode on the CPU, dense (threshold None) or CATS. CATS reads W_down^T only at the rows of
    neurons active for some token, and W_up too where it is row-major (a sparse layer under CATS:
    cpu_up_layout)."""
    shape, x = x.shape, x.reshape(-1, x.shape[-1])
    v = F.silu(linear(x, w_gate))
    if threshold is None:
        return _rows_sum(v * linear(x, w_up), w_down_t).view(shape)
    keep = cats_keep(v, threshold)
    if x.shape[0] > 1:  # a row is read if any token keeps it; zero it for the tokens that do not
        v, keep = torch.where(keep, v, 0), keep.any(dim=0)
    active = keep.view(-1).nonzero().view(-1)
    if active.numel() == 0:
        return x.new_zeros(shape)
    if active.numel() == w_down_t.shape[0]:  # nothing to skip: the dense arithmetic, bit for bit
        return _rows_sum(v * linear(x, w_up), w_down_t).view(shape)
    h = v.index_select(1, active) * _up_rows(x, w_up, active)
    return _rows_sum(h, w_down_t, active).view(shape)


def _up_rows(x, w_up, rows):
    """(x @ W_up^T)[:, rows]. Row-major W_up: a GEMV over a gather of those rows, on one thread (on
    two, the gather's and the GEMV's parallel regions wait for the other core: 2-8x slower under
    load). Column-major: all of it, which reads faster than any gather there (notes/cpu.md)."""
    if not w_up.is_contiguous():
        return linear(x, w_up).index_select(1, rows)
    with one_thread():
        return F.linear(x, w_up.index_select(0, rows))


def _mlp_kernel(x, w_gate, w_up, w_down_t, threshold):
    """The decode MLP on the Triton kernels (x a tensor or a Normed), or None where cuBLAS is the
    better choice (dense float, several tokens)."""
    int8 = isinstance(w_gate, Int8Weight)
    one_token = _one_token(_stream_and_norm(x)[0])
    if threshold is None and not (int8 or one_token):
        return None
    if not (threshold is not None and one_token):
        x = normalized(x)  # the norm folds into the CATS launches for one token only (see above)
    stream, norm = _stream_and_norm(x)
    if threshold is None and not int8:  # one token: the gated GEMV, then W_down^T on cuBLAS
        # .contiguous(): a no-op on CUDA; CPU weights may be column-major (tests run kernels there)
        return gemv(stream, w_gate.contiguous(), up=(w_up.contiguous(), None), use_triton=use_triton()) @ w_down_t
    if threshold is None and w_down_t.q_rows is not None:  # int8 dense: the gated GEMV, then W_down
        h = gemv(stream, w_gate.q, w_gate.scale, up=(w_up.q, w_up.scale), use_triton=use_triton())
        return gemv(h, w_down_t.q_rows, w_down_t.scale, use_triton=use_triton())
    if threshold is None:  # no [d, f] rows kept: the CATS kernel, skipping nothing
        threshold = torch.full((), float("-inf"), dtype=torch.float32, device=stream.device)
    rows = stream.reshape(-1, stream.shape[-1])
    if int8:
        y = cats_mlp(rows, w_gate.q, w_up.q, w_down_t.q, threshold, use_triton=use_triton(),
                     scales=(w_gate.scale, w_up.scale, w_down_t.scale), norm=norm)
    else:
        # .contiguous(): a no-op on CUDA; a CPU W_up may be column-major (cpu_up_layout), and tests
        # run the kernels on CPU tensors
        y = cats_mlp(rows, w_gate, w_up.contiguous(), w_down_t, threshold, use_triton=use_triton(), norm=norm)
    return y.view(stream.shape)


class Linear(nn.Module):
    """A bias-free linear layer whose `weight` is a float Parameter [out, in] or an Int8Weight."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight: Weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)

    def forward(self, x, residual=None):
        return linear(x, self.weight, residual)


# --- quantizing a model's decoder linears ---------------------------------------------------------

def decoder_linear_names(n_layers: int) -> list[str]:
    """Every weight quantize='int8' quantizes (the LM head and embeddings stay in the compute dtype)."""
    return [f"layers.{i}.{name}" for i in range(n_layers)
            for name in ("attention.wqkv.weight", "attention.wo.weight",
                         "feed_forward.w_gate", "feed_forward.w_up", "feed_forward.w_down_t")]


def set_weight(model: nn.Module, name: str, weight: Int8Weight):
    """Put an Int8Weight where the float weight `name` was (the float one is dropped)."""
    parent, attr = name.rsplit(".", 1)
    module = model.get_submodule(parent)
    delattr(module, attr)  # a Parameter's slot takes no module until it is gone
    setattr(module, attr, weight)


def quantized(name: str, w: torch.Tensor) -> Int8Weight:
    """Weight `name` quantized from w [out, in] as the checkpoint stores it (W_down, not W_down^T):
    W_down is kept transposed (CATS skips its rows) and in [d, f] rows (the dense GEMV)."""
    down = name.endswith("w_down_t")
    return Int8Weight.from_float(w, transpose=down, keep_rows=down)


def quantize_model(model: nn.Module) -> nn.Module:
    """Quantize every decoder linear of a float model in place, one tensor at a time, each float
    weight freed once its int8 copy is in (peak: the float model plus one int8 tensor)."""
    for name in decoder_linear_names(model.config.n_layers):
        w = model.get_parameter(name)
        set_weight(model, name, quantized(name, w.t() if name.endswith("w_down_t") else w))
        del w
    model.quantize = "int8"
    return model
