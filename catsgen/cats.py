"""CATS (arXiv 2404.08763): the thresholded MLP activation, installing it in a model, and
measuring the sparsity a run actually got.

CATS_t(v) = v where |v| > t, else 0, applied to v = SiLU(W_gate x), one threshold t per layer
(or, with the fisher allocation, one per neuron). The thresholds come from catsgen/thresholds.py.
"""

from __future__ import annotations

import torch

from catsgen.linear import UP_GATHER_SPARSITY, cats_keep, cpu_up_layout, mlp
from catsgen.model import DenseSiLU, Transformer, swapped_activations
from catsgen.thresholds import ThresholdsTable, check_sparsity


# --- the activation -----------------------------------------------------------------------------

class CATS(DenseSiLU):
    """Plugs into MLP.activation. The threshold is a float32 buffer (0-d, or [F] per neuron): a new
    sparsity is written into it in place, so a compiled decode step (and its CUDA graph) is
    reused, not recompiled."""

    def __init__(self, layer: int, threshold: float | torch.Tensor, device=None):
        super().__init__()
        self.layer = layer
        self.register_buffer("threshold", torch.as_tensor(threshold, dtype=torch.float32).to(device).clone())

    def forward(self, x, w_gate, w_up, w_down_t):
        return mlp(x, w_gate, w_up, w_down_t, self.threshold)  # catsgen/linear.py picks the kernel

    def keep(self, v):
        return cats_keep(v, self.threshold)

    def activate(self, v):
        return torch.where(self.keep(v), v, 0)


def set_dense(model: Transformer):
    for mlp in model.mlps:
        mlp.activation = DenseSiLU()
        mlp.w_up = cpu_up_layout(mlp.w_up, gather=False)


def set_thresholds(model: Transformer, threshold_vectors: list[float] | list[torch.Tensor],
                   sparsities: list[float] | None = None):
    """Install CATS in every layer (a threshold per layer, or an [F] vector per layer: one per
    neuron), or update the thresholds in place where a CATS of that shape already is. sparsities:
    each layer's (the thresholds table's); on the CPU, W_up becomes row-major in the layers sparse
    enough that the decode gathers its active rows (catsgen/linear.py UP_GATHER_SPARSITY)."""
    device = model.output.weight.device
    sparsities = sparsities or [0.0] * len(model.mlps)
    for i, (mlp, t, s) in enumerate(zip(model.mlps, threshold_vectors, sparsities, strict=True)):
        t = model.plan.local_thresholds(torch.as_tensor(t, dtype=torch.float32))  # this rank's neurons
        if isinstance(mlp.activation, CATS) and mlp.activation.threshold.shape == t.shape:
            mlp.activation.threshold.copy_(t)
        else:
            mlp.activation = CATS(i, t, device)
        mlp.w_up = cpu_up_layout(mlp.w_up, gather=s >= UP_GATHER_SPARSITY)


def set_sparsity(model: Transformer, table: ThresholdsTable, sparsity: float, allocation: str = "uniform"):
    """Dense at s = 0 (bit-identical to the plain model), CATS with the table's thresholds otherwise."""
    check_sparsity(sparsity)
    if sparsity == 0:
        set_dense(model)
    else:
        vectors, sparsities = table.threshold_vectors(sparsity, allocation), table.layer_sparsities(sparsity, allocation)
        set_thresholds(model, vectors, sparsities)


# --- measured sparsity ----------------------------------------------------------------------------

class SparsityCounter:
    """Per-layer counts of zeroed activations in a measuring forward, kept on the device.
    start: positions before it are not counted. union: a neuron counts as zeroed at a position
    only if it is zero for every sequence of the batch (what a batched kernel can skip)."""

    def __init__(self, n_layers: int, sparsity: float, start: int = 0, union: bool = False):
        self.sparsity, self.start, self.union = sparsity, start, union
        self.zeroed = [0] * n_layers
        self.total = [0] * n_layers

    def add(self, layer: int, keep: torch.Tensor):
        keep = keep[:, self.start:]  # [B, T, f]
        if self.union:
            keep = keep.any(dim=0)
        self.zeroed[layer] += keep.numel() - keep.sum()
        self.total[layer] += keep.numel()

    def per_layer(self) -> list[float]:
        return [float(z) / t if t else float("nan") for z, t in zip(self.zeroed, self.total)]

    def overall(self) -> float:
        total = sum(self.total)
        return float(sum(self.zeroed)) / total if total else float("nan")


class CountingCATS(DenseSiLU):
    """A layer's CATS (same threshold buffer) on the torch path, also counting what it zeroes:
    measuring forwards only, kept out of the decode hot path and its kernels."""

    def __init__(self, cats: CATS, counter: SparsityCounter):
        super().__init__()
        self.cats, self.counter = cats, counter

    def activate(self, v):
        keep = self.cats.keep(v)
        self.counter.add(self.cats.layer, keep)
        return torch.where(keep, v, 0)


def counting(model: Transformer, counter: SparsityCounter):
    """Count zeroed activations in the forwards inside (a context manager); the run's CATS
    activations come back after."""
    return swapped_activations(model, lambda i, a: CountingCATS(a, counter) if isinstance(a, CATS) else a)


@torch.no_grad()
def measure_sparsity(model: Transformer, idx: torch.Tensor, counter: SparsityCounter) -> SparsityCounter:
    """One plain forward (no KV cache) over idx [B, T], counting; kept out of the decode hot path."""
    with counting(model, counter):
        model(idx.to(model.output.weight.device))
    from catsgen.parallel import merge_counts
    return merge_counts(counter)  # tensor parallel: each rank counted its own neurons


def measure_generation_sparsity(model: Transformer, prompt: list[int], new: list[int],
                                counter: SparsityCounter) -> SparsityCounter:
    """Sparsity over the positions whose outputs chose the new tokens: the last prompt position
    and every new token but the last, the same inputs the decode loop fed through the MLPs."""
    counter.start = len(prompt) - 1
    return measure_sparsity(model, torch.tensor([(prompt + new)[:-1]]), counter)


def measure_union_sparsity(model: Transformer, prompt: list[int], batch_size: int) -> float:
    """For the benchmark: over the prompt fed as a batch of batch_size, the fraction of
    (position, neuron) pairs zero in every sequence, i.e. rows a batched decode step skips."""
    counter = SparsityCounter(model.config.n_layers, float("nan"), union=True)
    return measure_sparsity(model, torch.tensor([prompt]).repeat(batch_size, 1), counter).overall()


def report_sparsity(counter: SparsityCounter) -> str:
    per_layer = counter.per_layer()
    rows = [" ".join(f"{s:.3f}" for s in per_layer[i:i + 10]) for i in range(0, len(per_layer), 10)]
    layers = "\n".join(f"  layers {i * 10:>3}-{min(i * 10 + 9, len(per_layer) - 1):<3} {row}"
                       for i, row in enumerate(rows))
    return (f"[CATS sparsity: target {counter.sparsity:.2f}, measured {counter.overall():.3f} overall "
            f"(reference forward over the positions that chose the new tokens); per layer:]\n{layers}")
