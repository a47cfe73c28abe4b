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

from typing import Callable

import torch
import torch.nn.functional as F

from catsgen.cats import CATS, LEVELS, interpolate, set_dense
from catsgen.model import Transformer

GRID = (0.3, 0.5, 0.7, 0.9)  # sparsities at which each layer's KL is measured; linear in between
STEP = 0.01


def layer_bytes(model: Transformer) -> list[int]:
    """Bytes of W_up and W_down per layer: what a skipped neuron saves (all equal in Llama)."""
    return [(mlp.w_up.numel() + mlp.w_down_t.numel()) * mlp.w_up.element_size() for mlp in model.mlps]


def weighted_mean(sparsities: list[float], weights: list[int]) -> float:
    return sum(s * w for s, w in zip(sparsities, weights)) / sum(weights)


@torch.no_grad()
def layer_kl_curves(model: Transformer, per_layer: list[list[float]], windows: list[list[int]],
                    progress: Callable[[int], None] = lambda done: None) -> list[list[float]]:
    """[layer][grid point]: mean KL(dense || only this layer sparse at that grid sparsity)."""
    device = model.output.weight.device
    inputs = [torch.tensor([w], device=device) for w in windows]
    set_dense(model)
    dense = [F.log_softmax(model(idx)[0].float(), dim=-1) for idx in inputs]
    tokens = sum(idx.numel() for idx in inputs)
    curves = []
    for layer, (mlp, thresholds) in enumerate(zip(model.mlps, per_layer)):
        curve = []
        for s in GRID:
            mlp.activation = CATS(layer, interpolate(thresholds, s), device)
            kl = sum(F.kl_div(F.log_softmax(model(idx)[0].float(), dim=-1), ref, log_target=True,
                              reduction="sum") for idx, ref in zip(inputs, dense))
            curve.append(float(kl) / tokens)
        set_dense(model)
        curves.append(curve)
        progress(layer + 1)
    return curves


def greedy_allocation(curves: list[list[float]], weights: list[int]) -> list[list[float]]:
    """[level][layer] sparsities whose weighted mean is each level (to within one step of the
    heaviest layer), found by the greedy walk described above."""
    points = [0.0, *GRID]

    def cost(layer: int, s: float) -> float:  # KL at s: linear between grid points
        values = [0.0, *curves[layer]]
        k = min(sum(p <= s + 1e-9 for p in points) - 1, len(points) - 2)
        return values[k] + (values[k + 1] - values[k]) * (s - points[k]) / (points[k + 1] - points[k])

    n = len(curves)
    steps = [0] * n  # sparsity of layer l is steps[l] * STEP, kept in integers so sums stay exact
    allocation = [[0.0] * n]
    for level in LEVELS[1:]:
        while weighted_mean([k * STEP for k in steps], weights) < level - 1e-9:
            measured = [l for l in range(n) if (steps[l] + 1) * STEP <= GRID[-1] + 1e-9]
            if measured:
                layer = min(measured, key=lambda l: (cost(l, (steps[l] + 1) * STEP) - cost(l, steps[l] * STEP))
                            / weights[l])
            else:  # past the grid nothing was measured: raise the least sparse layer (uniform there)
                layer = min(range(n), key=lambda l: steps[l])
            steps[layer] += 1
        allocation.append([round(k * STEP, 2) for k in steps])
    return allocation


def describe(tokens: int) -> str:
    return (f"greedy over layers: KL to the dense next-token distribution on {tokens} calibration tokens "
            f"with one layer sparse at {', '.join(map(str, GRID))}, assumed additive")
