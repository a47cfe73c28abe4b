"""Weight-only quantization at load: symmetric round-to-nearest int8, one scale per output channel.

A linear weight W [out, in] (y = W x) becomes q int8 [out, in] and scale [out] with
W ~= q * scale[:, None], scale = max|W[o, :]| / 127, q = round(W / scale) in [-127, 127]; the
error of every entry is at most scale / 2 (of its channel). No calibration data is needed.

Layouts (DESIGN.md, kernel design): W_qkv, W_o, W_gate and W_up are stored as they are
([out, in], row = output channel = neuron for gate/up), so a neuron's row and its scale are
skipped together. W_down [d, f] is stored transposed, [f, d] with row i = neuron i, as the bf16
model stores it; its output channels are then the columns, so its scale [d] is per column and
is applied to y after the sum over neurons: a skipped neuron skips every byte of its row.

Scales are float32, not the compute dtype: a bf16 scale is off by up to 2^-9 of itself, one
error shared by the whole channel (systematic, unlike the rounding of q, which averages out in
the dot product), and it costs 2 bytes per 4096-byte row, 0.05% of the bytes; the kernels
multiply the fp32 accumulator by it, so fp32 needs no conversion either.
"""
import torch
from torch import nn

from catsgen.kernels import int8_gemv

QMAX = 127  # symmetric: -128 is never used, so -q is always representable


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] float -> (q int8 [out, in], scale float32 [out]), per output channel (row).

    A row of zeros gets scale 0 and q 0 (dequantizes to zeros exactly)."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_int8 takes a 2-D float weight, got {w.dim()}-D {w.dtype}")
    wf = w.float()
    scale = wf.abs().amax(dim=1) / QMAX
    divisor = torch.where(scale > 0, scale, 1.0)  # a zero row: 0 / 1 = 0, not 0 / 0
    q = torch.round(wf / divisor[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32, transposed: bool = False):
    """q * scale in `dtype`: scale per row of q, or per column when q is a transposed weight."""
    s = scale.float()[None, :] if transposed else scale.float()[:, None]
    return (q.float() * s).to(dtype)


class Int8Weight(nn.Module):
    """An int8 weight with its fp32 per-output-channel scales, held where a float weight was.

    q [rows, cols] int8 and scale float32: [rows] for a weight stored as [out, in]; [cols]
    when `transposed` (q holds W^T [in, out], as W_down^T [f, d]: the scale is per column).
    Buffers, not parameters: nothing here trains, and .to(device) moves them with the model."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, transposed: bool = False, keep_rows: bool = False):
        super().__init__()
        if q.dtype != torch.int8 or q.dim() != 2:
            raise ValueError(f"Int8Weight takes a 2-D int8 q, got {q.dim()}-D {q.dtype}")
        if scale.shape != (q.shape[1] if transposed else q.shape[0],):
            raise ValueError(f"scale {tuple(scale.shape)} does not fit q {tuple(q.shape)} (transposed={transposed})")
        self.register_buffer("q", q.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.transposed = transposed
        # keep_rows (a transposed weight only): also hold q in the [out, in] layout, for a dense
        # GEMV over output rows (W_down: the dense int8 MLP's int8_gemv; CATS reads q = W_down^T).
        self.register_buffer("q_rows", q.t().contiguous() if keep_rows and transposed else None)

    @classmethod
    def from_float(cls, w: torch.Tensor, transpose: bool = False, keep_rows: bool = False) -> "Int8Weight":
        """Quantize a linear weight w [out, in] per output channel; transpose=True stores
        q as w^T [in, out] (row = input channel, e.g. W_down -> W_down^T, row = neuron)."""
        q, scale = quantize_int8(w)
        return cls(q.t().contiguous() if transpose else q, scale, transposed=transpose, keep_rows=keep_rows)

    def _apply(self, fn, recurse=True):
        scale = self.scale
        super()._apply(fn, recurse)
        self.scale = scale.to(self.q.device)  # model.to(dtype) moves the scales but keeps them fp32
        return self

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The float weight in the stored layout ([out, in], or [in, out] when transposed)."""
        return dequantize_int8(self.q, self.scale, dtype, self.transposed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T for the linear weight W [out, in] this holds, in x.dtype (any leading dims):
        the int8 GEMV op (Triton on CUDA); for a transposed weight, torch (its fast path is the
        CATS MLP kernel, which reads W_down^T directly)."""
        if not self.transposed:
            return int8_gemv(x, self.q, self.scale)
        return ((x.float() @ self.q.float()) * self.scale).to(x.dtype)

    def nbytes(self) -> int:
        """Bytes a dense read of this weight costs: the int8 entries and the fp32 scales."""
        return self.q.numel() + 4 * self.scale.numel()

    def extra_repr(self) -> str:
        return f"shape={tuple(self.q.shape)}, transposed={self.transposed}"
