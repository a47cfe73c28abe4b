"""Per-layer sparsity allocation: spend the same bytes per token where the model minds least.

Decode speed depends only on how many W_up / W_down rows are skipped in total, so layers need not
share one sparsity. For every layer l and a few sparsities s on a grid, calibrate measures
KL_l(s): the mean KL divergence of the next-token distribution from the dense model's when only
layer l runs CATS at s (a short stretch of the calibration text). Treating the layers' costs as
additive, a greedy walk from all-dense raises, 0.01 at a time, the layer whose KL grows least per
byte skipped, and records the allocation each time the byte-weighted mean sparsity reaches a level
0.01..0.99. One walk serves every level, and the levels are nested, like TEAL's block-wise greedy.
Past the last grid point nothing was measured, so there every layer moves together (uniform).
"""

from __future__ import annotations

from math import log2
from typing import Callable

import torch
import torch.nn.functional as F

from catsgen.cats import CATS
from catsgen.linear import Weight, float_weight, linear, normalized
from catsgen.model import DenseSiLU, Transformer, swapped_activations
from catsgen.quantize import Int8Weight
from catsgen.thresholds import LEVELS, interpolate, interpolate_between

GRID = (0.3, 0.5, 0.7, 0.9)  # sparsities at which each layer's KL is measured; linear in between
STEP = 0.01


def layer_bytes(model: Transformer) -> list[int]:
    """Bytes of W_up and W_down per layer: what a skipped neuron saves (all equal in Llama)."""
    return [_bytes(mlp.w_up) + _bytes(mlp.w_down_t) for mlp in model.mlps]


def _bytes(w: Weight) -> int:
    return w.nbytes() if isinstance(w, Int8Weight) else w.numel() * w.element_size()


def weighted_mean(sparsities: list[float], weights: list[int]) -> float:
    return sum(s * w for s, w in zip(sparsities, weights)) / sum(weights)


@torch.no_grad()
def layer_kl_curves(model: Transformer, per_layer: list[list[float]], windows: list[list[int]],
                    progress: Callable[[int], None] = lambda done: None) -> list[list[float]]:
    """[layer][grid point]: mean KL(dense || only this layer sparse at that grid sparsity)."""
    device = model.output.weight.device
    inputs = [torch.tensor([w], device=device) for w in windows]
    tokens = sum(idx.numel() for idx in inputs)
    curves = []
    with swapped_activations(model, lambda i, _: DenseSiLU()):
        dense = [F.log_softmax(model(idx)[0].float(), dim=-1) for idx in inputs]
        for layer, row in enumerate(per_layer):
            curve = []
            for s in GRID:
                only_this = lambda i, a: CATS(layer, interpolate(row, s), device) if i == layer else a  # noqa: E731
                with swapped_activations(model, only_this):
                    kl = sum(F.kl_div(F.log_softmax(model(idx)[0].float(), dim=-1), ref, log_target=True,
                                      reduction="sum") for idx, ref in zip(inputs, dense))
                curve.append(float(kl) / tokens)
            curves.append(curve)
            progress(layer + 1)
    return curves


def greedy_allocation(curves: list[list[float]], weights: list[int]) -> list[list[float]]:
    """[level][layer] sparsities whose weighted mean is each level (to within one step of the
    heaviest layer), found by the greedy walk described above."""
    points = [0.0, *GRID]

    def cost(layer: int, s: float) -> float:  # KL at s: linear between grid points
        return interpolate_between(points, [0.0, *curves[layer]], s)

    n = len(curves)
    steps = [0] * n  # sparsity of layer l is steps[l] * STEP, kept in integers so sums stay exact
    per_level = [[0.0] * n]
    for level in LEVELS[1:]:
        while weighted_mean([k * STEP for k in steps], weights) < level - 1e-9:
            measured = [l for l in range(n) if (steps[l] + 1) * STEP <= GRID[-1] + 1e-9]
            if measured:
                layer = min(measured, key=lambda l: (cost(l, (steps[l] + 1) * STEP) - cost(l, steps[l] * STEP))
                            / weights[l])
            else:  # past the grid nothing was measured: raise the least sparse layer (uniform there)
                layer = min(range(n), key=lambda l: steps[l])
            steps[layer] += 1
        per_level.append([round(k * STEP, 2) for k in steps])
    return per_level


def describe(tokens: int) -> str:
    return (f"greedy over layers: KL to the dense next-token distribution on {tokens} calibration tokens "
            f"with one layer sparse at {', '.join(map(str, GRID))}, assumed additive")


# --- Fisher-weighted per-neuron thresholds ("fisher") ---------------------------------------------
#
# Zeroing neuron i of a layer at token t removes v_i u_i W_down[i] from the residual stream; to
# first order the loss moves by v_i u_i (g_t . W_down[i]), g_t = dNLL/d(MLP output) on the
# calibration text. The summed square of that (a diagonal Fisher estimate) is the cost of a
# threshold: neuron i at threshold t_i pays the costs of the calibration tokens with |v_i| <= t_i.
# Minimising the total cost for a given number of zeroed (token, neuron) pairs, over every neuron
# of every layer at once, is a Lagrangian: one multiplier lam per level, and each neuron zeroes
# the k tokens (in |v| order) minimising cost(k) - lam * k. That gives per-neuron thresholds and the
# per-layer allocation together; the decode kernel still decides from |v_i| > t_i alone.

FISHER_GRID = tuple(round(0.1 * i, 1) for i in range(1, 10))  # levels with stored per-neuron thresholds
FISHER_POINTS = 256  # each neuron's cost curve is kept at this many evenly spaced sparsities
# Steps of the bisection on log2(lam) over a range of 200: 2^-30 of it is far below one point's
# change in the zeroed count; each step is an argmin over every neuron's curve (the cost here).
FISHER_BISECTIONS = 36


class _FisherRecorder(DenseSiLU):
    """The dense MLP that keeps v and the gradient at h = v u, the down projection's input. That
    gradient is g W_down^T (g: the gradient at the MLP output), which the backward computes anyway,
    so h_i dL/dh_i = v_i u_i (g . W_down[i]) needs no product of its own."""

    def forward(self, x, w_gate, w_up, w_down_t):
        x = normalized(x)  # the block's norm (a Normed input), once for both products
        v = F.silu(linear(x, w_gate))  # int8 weights: the int8 GEMV op, whose backward is registered
        self.v = v.detach()
        self.h = v * linear(x, w_up)
        if not self.h.requires_grad:  # the first layer: nothing before it needs a gradient
            self.h.requires_grad_()
        self.h.retain_grad()
        return self.h @ float_weight(w_down_t, self.h.dtype)


def fisher_curves(model: Transformer, windows: list[list[int]],
                  progress: Callable[[int], None] = lambda done: None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (|v| sorted per neuron, cumulative cost in that order), both [FISHER_POINTS + 1, F],
    row k at k / FISHER_POINTS of the tokens. Needs every token's [F] values per layer in memory."""
    device = model.output.weight.device
    recorders = [_FisherRecorder() for _ in model.mlps]
    absv, cost = [[] for _ in recorders], [[] for _ in recorders]
    with swapped_activations(model, lambda i, _: recorders[i]):
        for n, window in enumerate(windows):
            idx = torch.tensor([window], device=device)
            with torch.enable_grad():  # gradients of the MLP outputs only (weights need none)
                F.cross_entropy(model(idx)[0, :-1].float(), idx[0, 1:], reduction="sum").backward()
            for layer, r in enumerate(recorders):
                absv[layer].append(r.v[0, :-1].float().abs())
                cost[layer].append((r.h[0, :-1].detach().float() * r.h.grad[0, :-1].float()) ** 2)
            progress(n + 1)
    return [_curve(torch.cat(a), torch.cat(c)) for a, c in zip(absv, cost)]


def _curve(absv: torch.Tensor, cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ordered, order = absv.sort(dim=0)
    cumulative = torch.cat([cost.new_zeros(1, cost.shape[1]), cost.gather(0, order).cumsum(0)]).double()
    rows = torch.linspace(0, absv.shape[0], FISHER_POINTS + 1).round().long()
    padded = torch.cat([ordered.new_zeros(1, ordered.shape[1]), ordered])  # padded[k]: k-th smallest
    # the threshold for k zeroed tokens: midway between the k-th and (k+1)-th smallest |v|
    upper = torch.cat([ordered, ordered[-1:]])
    thresholds = torch.where(rows[:, None] > 0, (padded[rows] + upper[rows]) / 2, 0.0)
    return thresholds.float(), cumulative[rows]


def fisher_level(curves, level: float) -> tuple[list[torch.Tensor], list[float]]:
    """Per-neuron thresholds (one [F] tensor per layer) zeroing a fraction `level` of all
    calibration (token, neuron) pairs at least total cost, and each layer's resulting sparsity."""
    points = torch.arange(FISHER_POINTS + 1, dtype=torch.float64)[:, None]
    costs = torch.cat([c for _, c in curves], dim=1)  # every neuron of every layer: one argmin per step

    def chosen(lam):  # each neuron's number of points zeroed at multiplier lam
        return (costs - lam * points).argmin(0)

    target = level * costs.shape[1] * FISHER_POINTS
    high = log2(float(costs[-1].max()) + 1e-300) + 1  # lam = 2^high zeroes all
    low = high - 200
    for _ in range(FISHER_BISECTIONS):  # bisection on log lam: the zeroed fraction grows with lam
        mid = (low + high) / 2
        if int(chosen(2.0 ** mid).sum()) < target:
            low = mid
        else:
            high = mid
    ks = chosen(2.0 ** high).split([c.shape[1] for _, c in curves])
    vectors = [t.gather(0, k[None])[0] for (t, _), k in zip(curves, ks)]
    return vectors, [float(k.double().mean()) / FISHER_POINTS for k in ks]


def fisher_allocation(curves, weights: list[int]) -> dict:
    """The file entry's tables: per-neuron thresholds at each FISHER_GRID level ([level][layer][F]),
    and every level's per-layer sparsities ([100][layer]), linear between grid levels (as the
    thresholds are at run time) and towards uniform 0.99 past the grid."""
    grid_thresholds, grid_sparsity = [], []
    for level in FISHER_GRID:
        vectors, sparsity = fisher_level(curves, level)
        grid_thresholds.append([[float(f"{t:.4g}") for t in layer.tolist()] for layer in vectors])
        grid_sparsity.append(on_target(sparsity, weights, level))
    points = [0.0, *FISHER_GRID, LEVELS[-1]]
    rows = [[0.0] * len(weights), *grid_sparsity, [LEVELS[-1]] * len(weights)]
    sparsity = [[round(interpolate_between(points, column, level), 4) for column in zip(*rows)] for level in LEVELS]
    return {"grid": list(FISHER_GRID), "neuron_thresholds": grid_thresholds, "sparsity": sparsity}


def on_target(sparsity: list[float], weights: list[int], level: float) -> list[float]:
    """The layers' calibration sparsities, shifted (within [0, 0.99]) so that their byte-weighted
    mean is exactly the level: the bytes the allocation promises, whatever rounding the solver did."""
    sparsity = list(sparsity)
    for _ in range(len(sparsity)):  # each pass pins at least one more layer at a bound, or is done
        shift = level - weighted_mean(sparsity, weights)
        free = [l for l, s in enumerate(sparsity) if (0 < s if shift < 0 else s < LEVELS[-1])]
        if abs(shift) < 1e-12 or not free:
            break
        step = shift * sum(weights) / sum(weights[l] for l in free)
        for l in free:
            sparsity[l] = min(max(sparsity[l] + step, 0.0), LEVELS[-1])
    return sparsity


def describe_fisher(tokens: int) -> str:
    return (f"fisher: per-neuron thresholds minimising the summed squared first-order loss change "
            f"(v_i u_i g.W_down[i])^2 on {tokens} calibration tokens, one Lagrange multiplier over all "
            f"layers per level; stored at levels {', '.join(map(str, FISHER_GRID))}, linear in between")
