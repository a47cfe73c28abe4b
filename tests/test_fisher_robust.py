"""The fisher allocation's cost shrinkage (issue 19): each neuron's costs mixed with its layer's
pooled cost at the same |v|. Whatever the shrink factor, the calibration values zeroed stay on
target (the bytes read per token) and S = 0 stays dense."""

import pytest
import torch

from catsgen import allocation, cats
from catsgen.calibrate import calibrate
from catsgen.checkpoint import load_model


def layers(n_layers=3, tokens=512, neurons=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    absv = [torch.rand(tokens, neurons, generator=g) for _ in range(n_layers)]
    # costs differ by neuron and by layer, and are noisy per token
    cost = [(a * torch.rand(neurons, generator=g) * 10 ** l) ** 2 * torch.rand(tokens, neurons, generator=g)
            for l, a in enumerate(absv)]
    return absv, cost


def test_shrunk_keeps_each_bins_total_and_pools_within_a_bin():
    absv, cost = layers(n_layers=1)
    assert torch.equal(allocation.shrunk(absv[0], cost[0], 1.0), cost[0])
    pooled = allocation.shrunk(absv[0], cost[0], 0.0)
    assert float(pooled.sum()) == pytest.approx(float(cost[0].sum()), rel=1e-4)
    low = absv[0] <= absv[0].flatten().kthvalue(absv[0].numel() // 200).values  # inside the first bin
    assert pooled[low].unique().numel() == 1  # one cost per |v| bin: no neuron's own noise left
    half = allocation.shrunk(absv[0], cost[0], 0.5)
    assert torch.allclose(half, (cost[0] + pooled) / 2)


@pytest.mark.parametrize("shrink", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("level", [0.3, 0.5, 0.7])
def test_zeroed_fraction_stays_on_target(shrink, level):
    absv, cost = layers()
    curves = [allocation._curve(a, allocation.shrunk(a, c, shrink)) for a, c in zip(absv, cost)]
    thresholds, per_layer = allocation.fisher_level(curves, level)
    zeroed = [float((a <= t).double().mean()) for a, t in zip(absv, thresholds)]
    assert allocation.weighted_mean(zeroed, [1] * len(zeroed)) == pytest.approx(level, abs=0.005)
    assert zeroed == pytest.approx(per_layer, abs=0.005)


def test_calibrated_file_on_target_and_zero_dense(checkpoints, tmp_path):
    directory = checkpoints["gqa"][0]
    table = calibrate(directory, None, max_tokens=256, seq_len=128, out=tmp_path / "t.json", log=lambda m: None,
                      allocation_tokens=0, fisher_tokens=128, fisher_shrink=0.5)
    entry = cats.Thresholds.load(tmp_path / "t.json").allocations["fisher"]
    assert entry["shrink"] == 0.5
    weights = [1] * table.model["n_layers"]
    for level, sparsities in zip(cats.LEVELS, entry["sparsity"]):
        assert allocation.weighted_mean(sparsities, weights) == pytest.approx(level, abs=0.005)
    model = load_model(directory)
    idx = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(idx)
        cats.set_sparsity(model, table, 0.5, "fisher")
        assert not torch.equal(model(idx), dense)
        cats.set_sparsity(model, table, 0.0, "fisher")
        assert torch.equal(model(idx), dense)
