"""Torch reference for the CATS MLP: the definition the Triton kernels must match.

Also the CPU implementation of the custom op (catsgen::cats_mlp).
"""
import torch
import torch.nn.functional as F


def cats_mlp_reference(x, w_gate, w_up, w_down_t, threshold, scales=None):
    """y = W_down (CATS_t(SiLU(W_gate x)) * (W_up x)), computed in fp32, returned in x.dtype.

    x [B, d]; w_gate, w_up [f, d]; w_down_t [f, d] (W_down transposed: row i = neuron i);
    threshold: 0-d tensor, or [f] for a per-neuron threshold. CATS_t(v) = v where |v| > t, else 0.
    scales: None, or int8 weights' fp32 scales (s_gate [f], s_up [f], s_down [d]): W_gate =
    w_gate * s_gate[:, None], W_up likewise, W_down^T = w_down_t * s_down[None, :].
    """
    if scales is not None:
        s_gate, s_up, s_down = (s.float() for s in scales)
        w_gate, w_up, w_down_t = w_gate.float() * s_gate[:, None], w_up.float() * s_up[:, None], \
            w_down_t.float() * s_down[None, :]
    xf = x.float()
    v = F.silu(xf @ w_gate.float().t())
    v = torch.where(v.abs() > threshold.float(), v, 0.0)
    h = v * (xf @ w_up.float().t())
    return (h @ w_down_t.float()).to(x.dtype)
