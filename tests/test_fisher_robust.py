"""The fisher allocation (the default) stays on target however its costs are spread: the byte-weighted
fraction of calibration values zeroed equals the level within 0.005, per layer as planned, and S = 0
stays exactly dense (issue 19)."""

import pytest
import torch

from catsgen import allocations, cats
from catsgen.checkpoint import load_model
from catsgen.thresholds import LEVELS, ThresholdsTable
from helpers_cats import calibrate_quietly


def layers(n_layers=3, tokens=512, neurons=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    absv = [torch.rand(tokens, neurons, generator=g) for _ in range(n_layers)]
    # costs differ by neuron and by layer, and are noisy per token
    cost = [(a * torch.rand(neurons, generator=g) * 10 ** layer) ** 2 * torch.rand(tokens, neurons, generator=g)
            for layer, a in enumerate(absv)]
    return absv, cost


@pytest.mark.parametrize("level", [0.3, 0.5, 0.7])
def test_zeroed_fraction_stays_on_target(level):
    absv, cost = layers()
    curves = [allocations._curve(a, c) for a, c in zip(absv, cost)]
    thresholds, per_layer = allocations.fisher_level(curves, level)
    zeroed = [float((a <= t).double().mean()) for a, t in zip(absv, thresholds)]
    assert allocations.weighted_mean(zeroed, [1] * len(zeroed)) == pytest.approx(level, abs=0.005)
    assert zeroed == pytest.approx(per_layer, abs=0.005)


def test_calibrated_file_on_target_and_zero_dense(checkpoints, tmp_path):
    directory = checkpoints["gqa"][0]
    table = calibrate_quietly(directory, tmp_path / "t.json", tokens=256, fisher_tokens=128)
    entry = ThresholdsTable.load(tmp_path / "t.json").allocations["fisher"]
    weights = [1] * table.model["n_layers"]
    for level, sparsities in zip(LEVELS, entry["sparsity"]):
        assert allocations.weighted_mean(sparsities, weights) == pytest.approx(level, abs=0.005)
    model = load_model(directory)
    idx = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(idx)
        cats.set_sparsity(model, table, 0.5, "fisher")
        assert not torch.equal(model(idx), dense)
        cats.set_sparsity(model, table, 0.0, "fisher")
        assert torch.equal(model(idx), dense)
