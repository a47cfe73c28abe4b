"""Throwaway: perplexity with the int8 quantizer replaced by a per-channel clipping search."""
import sys
import torch
import catsgen.quantize as Q

RATIOS = tuple(1.0 - 0.01 * i for i in range(31)) if "--fine" in sys.argv else (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def quantize_mse(w):
    wf = w.float()
    absmax = wf.abs().amax(dim=1)
    best_err = torch.full_like(absmax, float("inf"))
    best_scale = absmax / Q.QMAX
    for r in RATIOS:
        scale = absmax * r / Q.QMAX
        divisor = torch.where(scale > 0, scale, 1.0)
        q = torch.round(wf / divisor[:, None]).clamp_(-Q.QMAX, Q.QMAX)
        err = ((wf - q * scale[:, None]) ** 2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    divisor = torch.where(best_scale > 0, best_scale, 1.0)
    q = torch.round(wf / divisor[:, None]).clamp_(-Q.QMAX, Q.QMAX).to(torch.int8)
    return q, best_scale


if sys.argv[1] == "mse":
    Q.quantize_int8 = quantize_mse
from catsgen.cli import main
main(argv=[a for a in sys.argv[2:] if a != "--fine"], command="perplexity")
