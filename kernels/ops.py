"""The custom op catsgen::cats_mlp, so a compiled decode step (fullgraph, CUDA graphs) treats
the Triton launches as one opaque call, plus the public entry point cats_mlp."""
from typing import Optional

import torch

from .reference import cats_mlp_reference


@torch.library.custom_op("catsgen::cats_mlp", mutates_args=())
def _cats_mlp_op(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
                 threshold: torch.Tensor, s_gate: Optional[torch.Tensor] = None,
                 s_up: Optional[torch.Tensor] = None, s_down: Optional[torch.Tensor] = None) -> torch.Tensor:
    # Returns float32: the cast to x.dtype happens outside the op, where torch.compile fuses it
    # into the following residual add instead of launching one more kernel per layer.
    scales = None if s_gate is None else (s_gate, s_up, s_down)
    if x.is_cuda:
        from .triton_mlp import cats_mlp_triton  # triton is only needed where it runs
        return cats_mlp_triton(x, w_gate, w_up, w_down_t, threshold, fp32_out=True, scales=scales)
    return cats_mlp_reference(x, w_gate, w_up, w_down_t, threshold, scales).float()


@_cats_mlp_op.register_fake
def _(x, w_gate, w_up, w_down_t, threshold, s_gate=None, s_up=None, s_down=None):
    return torch.empty_like(x, dtype=torch.float32)


def cats_mlp(x, w_gate, w_up, w_down_t, threshold, use_triton: bool | None = None, scales=None):
    """y [B, d] = W_down (CATS_t(SiLU(W_gate x)) * (W_up x)), in x.dtype; see reference.py.
    scales: None for float weights; (s_gate [f], s_up [f], s_down [d]) fp32 for int8 weights
    (catsgen/quantize.py: w_gate, w_up per row, w_down_t = W_down^T per column).

    use_triton: None (default) runs the custom op: Triton on CUDA, the torch reference elsewhere.
    True forces the Triton path (CPU tensors need TRITON_INTERPRET=1 set before triton is
    imported); False forces the reference.
    """
    if use_triton:
        from .triton_mlp import cats_mlp_triton
        return cats_mlp_triton(x, w_gate, w_up, w_down_t, threshold, scales=scales)
    if use_triton is False:
        return cats_mlp_reference(x, w_gate, w_up, w_down_t, threshold, scales)
    return torch.ops.catsgen.cats_mlp(x, w_gate, w_up, w_down_t, threshold, *(scales or ())).to(x.dtype)
