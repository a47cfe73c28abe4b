"""Torch reference for the CATS MLP: the definition the Triton kernels must match.

Also the CPU implementation of the custom op (catsgen::cats_mlp).
"""
import torch
import torch.nn.functional as F


def cats_mlp_reference(x, w_gate, w_up, w_down_t, threshold):
    """y = W_down (CATS_t(SiLU(W_gate x)) * (W_up x)), computed in fp32, returned in x.dtype.

    x [B, d]; w_gate, w_up [f, d]; w_down_t [f, d] (W_down transposed: row i = neuron i);
    threshold: 0-d tensor, or [f] for a per-neuron threshold. CATS_t(v) = v where |v| > t, else 0.
    """
    xf = x.float()
    v = F.silu(xf @ w_gate.float().t())
    v = torch.where(v.abs() > threshold.float(), v, 0.0)
    h = v * (xf @ w_up.float().t())
    return (h @ w_down_t.float()).to(x.dtype)
