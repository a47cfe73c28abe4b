# Run as-is for benchmarks/quality/int8_clipping.md (paths under /tmp/wtq: the stats file of int8_clipping_stats.py).
"""Throwaway: perplexity with the int8 quantizer's per-channel scale chosen by a variant.
usage: variant.py VARIANT <perplexity args>; VARIANT: absmax | mse | mse05 | wmse"""
import sys, torch
import catsgen.quantize as Q
import catsgen.linear as L

CLIP_RATIOS = tuple(round(1.0 - 0.01 * i, 2) for i in range(31))  # 1.00, 0.99, ..., 0.70


def round_clamp(wf, scale):
    divisor = torch.where(scale > 0, scale, 1.0)
    return torch.round(wf / divisor[:, None]).clamp_(-Q.QMAX, Q.QMAX)


def search(wf, ratios, weight=None):
    absmax = wf.abs().amax(dim=1)
    best_err = torch.full_like(absmax, float("inf")); best_scale = absmax * ratios[0] / Q.QMAX
    for r in ratios:
        scale = absmax * r / Q.QMAX
        d = (wf - round_clamp(wf, scale) * scale[:, None]).square()
        err = (d if weight is None else d * weight[None, :]).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err); best_scale = torch.where(better, scale, best_scale)
    return round_clamp(wf, best_scale).to(torch.int8), best_scale

variant = sys.argv[1]
if variant == "wmse":
    stats = torch.load("/tmp/wtq/actstats.pt")
    def quantized(name, w):
        down = name.endswith("w_down_t")
        q, s = search(w.float(), CLIP_RATIOS, stats[name])
        return Q.Int8Weight(q.t().contiguous() if down else q, s, transposed=down, keep_rows=down)
    L.quantized = quantized
elif variant == "mse05":
    Q.quantize_int8 = lambda w: search(w.float(), (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7))
elif variant == "absmax":
    Q.quantize_int8 = lambda w: search(w.float(), (1.0,))
elif variant == "mse":
    Q.quantize_int8 = lambda w: search(w.float(), CLIP_RATIOS)
from catsgen.cli import main
main(argv=sys.argv[2:], command="perplexity")
